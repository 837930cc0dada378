"""Family-specific properties of the sparse variants (the conformance suite covers the rest)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants.bigbird import BigBird
from attention_variants.common import softmax_flops
from attention_variants.tiled import BlockSizes, make_schedule

F32 = dict(rtol=1e-5, atol=1e-5)


def covering_inputs(segmented):
    q, k, v = random_qkv(0, T=40)
    return q, k, v, dict(segment_ids=packed_segments(1, 2, 40) if segmented else None)


@functools.cache
def blockwise_output(causal, segmented):
    """blockwise on `covering_inputs`, computed once for all the windows compared with it."""
    q, k, v, kw = covering_inputs(segmented)
    return av.get("blockwise", block_q=16, block_k=8)(q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [40, (39, 39), (1000, 1000)])
def test_window_covering_the_row_equals_blockwise(causal, window):
    fn = av.get("sliding_window", window=window, block_q=16, block_k=8)
    for segmented in (False, True):
        if not causal and window == 40:  # an int W is (W - 1, 0): it never looks ahead
            continue
        q, k, v, kw = covering_inputs(segmented)
        np.testing.assert_allclose(
            fn(q, k, v, causal=causal, **kw), blockwise_output(causal, segmented), **F32
        )


def test_bigbird_is_deterministic_for_a_seed():
    q, k, v = random_qkv(2, T=96)
    fn = av.get("bigbird", block=8, window=2, num_global=1, num_random=2, seed=5)
    np.testing.assert_array_equal(fn(q, k, v), fn(q, k, v))
    tables = [BigBird(8, 2, 1, 2, seed=s).sized(96, 96).table for s in (5, 5, 6)]
    np.testing.assert_array_equal(tables[0], tables[1])
    assert not np.array_equal(tables[0], tables[2]), "the seed does not change the draws"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_draws_num_random_new_blocks_per_row(seed, causal):
    table = BigBird(4, 3, 2, 3, seed=seed, causal=causal).sized(200, 200).table
    base = BigBird(4, 3, 2, 0, seed=seed, causal=causal).sized(200, 200).table  # no random
    assert not np.any(base & ~table), "random blocks replaced window or global ones"
    extra = table.sum(1) - base.sum(1)
    free = (np.tril(~base) if causal else ~base).sum(1)
    np.testing.assert_array_equal(extra[2:], np.minimum(free, 3)[2:])
    if causal:  # draws do not depend on T: a prefix keeps its pattern as the sequence grows
        prefix = BigBird(4, 3, 2, 3, seed=seed).sized(80, 80).table
        np.testing.assert_array_equal(prefix, table[:20, :20])


def test_bigbird_causal_prefix_is_unchanged_by_extension():
    q, k, v = random_qkv(3, B=1, T=80)
    fn = jax.jit(av.get("bigbird", block=8, window=2, num_global=1, num_random=2))
    np.testing.assert_allclose(fn(q, k, v)[:, :48], fn(q[:, :48], k[:, :48], v[:, :48]), **F32)


@pytest.mark.parametrize(
    "name,options,option",
    [
        ("sliding_window", {"window": 0}, "window"),
        ("sliding_window", {"window": (3, -1)}, "right"),
        ("sliding_window", {"block_q": 0}, "block_q"),
        ("fixed", {"block": 0}, "block"),
        ("fixed", {"block": 8, "summary": 9}, "summary"),
        ("fixed", {"block_k": -2}, "block_k"),
        ("bigbird", {"block": 0}, "block"),
        ("bigbird", {"window": 0}, "window"),
        ("bigbird", {"window": (1, -1)}, "right"),
        ("bigbird", {"num_global": -1}, "num_global"),
        ("bigbird", {"num_random": 1.5}, "num_random"),
        ("bigbird", {"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_naming_the_option(name, options, option):
    with pytest.raises(ValueError, match=option):
        av.get(name, **options)


FLOPS_CASES = [
    ("sliding_window", {"window": 7}),
    ("sliding_window", {"window": (3, 5)}),
    ("fixed", {"block": 8, "summary": 3}),
    ("fixed", {"block": 16, "summary": 16}),
    ("bigbird", {"block": 4, "window": (1, 1), "num_global": 1, "num_random": 2}),
]


@pytest.mark.parametrize("name,options", FLOPS_CASES)
@pytest.mark.parametrize("causal,T,S", [(True, 61, 61), (False, 61, 61), (False, 45, 70)])
def test_flops_count_the_visible_pairs(name, options, causal, T, S):
    spec = av.spec(name)
    mask = spec.mask(causal=causal, **spec.options(**options)).sized(T, S)
    pairs = int(mask.dense(T, S).sum())
    assert spec.flops(2, T, S, 4, 16, causal=causal, **options) == softmax_flops(2, 4, 16, pairs)


def default_schedule(name, T, segmented=False):
    spec = av.spec(name)
    options = spec.options()
    mask = spec.mask(causal=True, **options).sized(T, T)
    tiles = mask.preferred_tiles(segmented) or (options["block_q"], options["block_k"])
    if None in tiles:
        tiles = (BlockSizes().block_q, BlockSizes().block_k)
    return mask, tiles, make_schedule(mask, T, T, *tiles, segmented, 0)


@pytest.mark.parametrize("name", ["sliding_window", "bigbird"])
def test_tile_count_grows_linearly(name):
    """Past the first rows every query tile visits a fixed number of key tiles."""
    counts = [default_schedule(name, T)[2].tiles for T in (4096, 8192, 32768)]
    assert (counts[2] - counts[1]) / (counts[1] - counts[0]) == pytest.approx(6, rel=0.01)


def test_window_band_of_tiles():
    sched = default_schedule("sliding_window", 16384)[2]  # window 512 = (511, 0), 64 x 64 tiles
    assert sched.count.max() == 512 // 64 + 1  # the band: 8 key tiles plus the diagonal
    assert sched.full.max() == 512 // 64 - 1  # only its two ends need the mask


@pytest.mark.parametrize("name", ["sliding_window", "fixed", "bigbird"])
def test_only_visible_tiles_are_scheduled(name):
    """With the default (aligned) tiles every scheduled tile holds a visible pair."""
    T = 1024
    mask, (bq, bk), sched = default_schedule(name, T)
    seen = mask.dense(T, T).reshape(T // bq, bq, T // bk, bk).any((1, 3))
    assert sched.tiles == seen.sum()


@pytest.mark.parametrize("name", ["fixed", "bigbird"])
def test_packed_block_patterns_run_the_causal_band(name):
    """Block patterns are laid per document, so packed rows run every causal tile (pruned by
    segments at run time); the window keeps its band, since it depends on k - q only."""
    T = 2048
    _, (bq, bk), sched = default_schedule(name, T, segmented=True)
    n = T // bq
    assert (bq, bk) == (512, 512) and sched.tiles == n * (n + 1) // 2
    window = default_schedule("sliding_window", T, segmented=True)[2]
    assert window.tiles == default_schedule("sliding_window", T)[2].tiles
