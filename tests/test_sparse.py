"""Family-specific properties of the sparse variants (the conformance suite covers the rest)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants.bigbird import BigBird
from attention_variants.common import softmax_flops, visible_pairs
from attention_variants.masks import Fixed, Window
from attention_variants.tiled import make_schedule

F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [40, 41, 1000])
def test_window_at_least_length_equals_blockwise(causal, window):
    q, k, v = random_qkv(0, T=40)
    seg = packed_segments(1, 2, 40)
    fn = av.get("sliding_window", window=window, block_q=16, block_k=8)
    ref = av.get("blockwise", block_q=16, block_k=8)
    for s in (None, seg):
        kw = dict(causal=causal, segment_ids=s)
        np.testing.assert_allclose(fn(q, k, v, **kw), ref(q, k, v, **kw), **F32)


def test_bigbird_is_deterministic_for_a_seed():
    q, k, v = random_qkv(2, T=96)
    fn = av.get("bigbird", block=8, window=2, num_global=1, num_random=2, seed=5)
    np.testing.assert_array_equal(fn(q, k, v), fn(q, k, v))
    tables = [BigBird(8, 2, 1, 2, seed=s).at(96, 96).table for s in (5, 5, 6)]
    np.testing.assert_array_equal(tables[0], tables[1])
    assert not np.array_equal(tables[0], tables[2]), "the seed does not change the draws"


@pytest.mark.parametrize("seed", range(4))
def test_bigbird_random_blocks_are_causal_and_counted(seed):
    pattern = BigBird(block=4, window=3, num_global=2, num_random=3, seed=seed)
    table = np.frombuffer(pattern.at(200, 200).table_bytes, bool).reshape(50, 50)
    assert not np.any(np.triu(table, 1)), "a block sees a later block"
    base = BigBird(4, 3, 2, 0, seed=seed).at(200, 200).table  # window and global only
    extra = table.sum(1) - base.sum(1)
    free = np.tril(~base).sum(1)
    np.testing.assert_array_equal(extra[2:], np.minimum(free, 3)[2:])
    # Causal draws do not depend on T: a prefix keeps its pattern as the sequence grows.
    np.testing.assert_array_equal(BigBird(4, 3, 2, 3, seed=seed).at(80, 80).table, table[:20, :20])


def test_bigbird_causal_prefix_is_unchanged_by_extension():
    q, k, v = random_qkv(3, B=1, T=80)
    fn = jax.jit(av.get("bigbird", block=8, window=2, num_global=1, num_random=2))
    np.testing.assert_allclose(fn(q, k, v)[:, :48], fn(q[:, :48], k[:, :48], v[:, :48]), **F32)


@pytest.mark.parametrize(
    "name,options,option",
    [
        ("sliding_window", {"window": 0}, "window"),
        ("sliding_window", {"block_q": 0}, "block_q"),
        ("fixed", {"block": 0}, "block"),
        ("fixed", {"block": 8, "summary": 9}, "summary"),
        ("fixed", {"block_k": -2}, "block_k"),
        ("bigbird", {"block": 0}, "block"),
        ("bigbird", {"window": 0}, "window"),
        ("bigbird", {"num_global": -1}, "num_global"),
        ("bigbird", {"num_random": 1.5}, "num_random"),
        ("bigbird", {"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_naming_the_option(name, options, option):
    with pytest.raises(ValueError, match=option):
        av.get(name, **options)


FLOPS_CASES = [
    ("sliding_window", {"window": 7}, lambda c, o: Window(o["window"], c)),
    ("fixed", {"block": 8, "summary": 3}, lambda c, o: Fixed(o["block"], o["summary"], c)),
    ("fixed", {"block": 16, "summary": 16}, lambda c, o: Fixed(o["block"], o["summary"], c)),
    ("bigbird", {"block": 4, "window": 2, "num_global": 1, "num_random": 2}, None),
]


@pytest.mark.parametrize("name,options,make", FLOPS_CASES)
@pytest.mark.parametrize("causal,T,S", [(True, 61, 61), (False, 61, 61), (False, 45, 70)])
def test_flops_count_the_visible_pairs(name, options, make, causal, T, S):
    spec = av.spec(name)
    mask = spec.mask(causal=causal, **spec.options(**options))
    pairs = (
        int(mask.dense(T, S).sum()) if make is None else visible_pairs(make(causal, options), T, S)
    )
    assert spec.flops(2, T, S, 4, 16, causal=causal, **options) == softmax_flops(2, 4, 16, pairs)


def test_flops_are_cheap_at_long_lengths():
    for name in ("sliding_window", "fixed", "bigbird"):
        spec = av.spec(name)
        assert spec.flops(1, 131072, 131072, 8, 64, causal=True, **spec.defaults) > 0


def default_plan(name, T):
    """The mask and tile sizes the kernel `name` runs with its default options at length T."""
    module = getattr(av, name)  # the variant's module: attention_variants.<name>
    return module.plan(T, T, True, **av.spec(name).options())


def default_schedule(name, T):
    mask, tiles = default_plan(name, T)
    return make_schedule(mask, T, T, tiles.block_q, tiles.block_k, False)


@pytest.mark.parametrize("name", ["sliding_window", "bigbird"])
def test_tile_count_grows_linearly(name):
    """Past the first rows every query tile visits a fixed number of key tiles."""
    counts = [default_schedule(name, T).tiles for T in (4096, 8192, 32768)]
    assert (counts[2] - counts[1]) / (counts[1] - counts[0]) == pytest.approx(6, rel=0.01)


def test_window_band_of_tiles():
    sched = default_schedule("sliding_window", 16384)  # window 512, 64 x 64 tiles
    assert sched.count.max() == 512 // 64 + 1  # the band: 8 key tiles plus the diagonal
    assert sched.full.max() == 512 // 64 - 1  # only its two ends need the mask


@pytest.mark.parametrize("name", ["sliding_window", "fixed", "bigbird"])
def test_only_visible_tiles_are_scheduled(name):
    """With the default (aligned) tiles every scheduled tile holds a visible pair."""
    T = 1024
    mask, tiles = default_plan(name, T)
    bq, bk = tiles.block_q, tiles.block_k
    seen = mask.dense(T, T).reshape(T // bq, bq, T // bk, bk).any((1, 3))
    assert default_schedule(name, T).tiles == seen.sum()
