"""Mask predicates, property-tested: tile answers, `reach`, jax vs numpy, `pairs` against `dense`.

Random masks of every kind meet random shapes, offsets and tiles; `dense` is the reference.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attention_variants.bigbird import BigBird
from attention_variants.masks import (
    BlockSparse,
    Causal,
    Fixed,
    LogicalOr,
    Mask,
    Sinks,
    Window,
    window_extent,
)

SETTINGS = settings(max_examples=60, deadline=None)
LENGTHS = st.integers(1, 80)
OFFSETS = st.sampled_from([0, 0, 1, 7, 33])

WINDOWS = st.builds(Window, st.integers(0, 20), st.integers(0, 20))
FIXED = st.integers(1, 16).flatmap(
    lambda block: st.builds(Fixed, st.just(block), st.integers(0, block), st.booleans())
)
BIGBIRDS = st.builds(
    BigBird,
    block=st.integers(1, 8),
    window=st.one_of(st.integers(1, 4), st.tuples(st.integers(0, 3), st.integers(0, 3))),
    num_global=st.integers(0, 3),
    num_random=st.integers(0, 4),
    seed=st.integers(0, 1000),
    causal=st.booleans(),
)
TABLES = hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, max_side=8))
BLOCK_SPARSE = st.builds(
    lambda table, block, causal: BlockSparse.of(table, block, causal),
    TABLES,
    st.integers(1, 16),
    st.booleans(),
)
SINKS = st.builds(Sinks, st.integers(0, 6), st.booleans())
BASIC = {
    "full": st.just(Mask()),
    "causal": st.just(Causal()),
    "window": WINDOWS,
    "fixed": FIXED,
    "bigbird": BIGBIRDS,
    "block_sparse": BLOCK_SPARSE,
    "sinks": SINKS,
}
PARTS = st.one_of(*BASIC.values())
KINDS = {
    **BASIC,
    "or": st.builds(lambda a, b: a | b, PARTS, PARTS),
    "and": st.builds(lambda a, b: a & b, PARTS, PARTS),
    "sinks_or_window": st.builds(lambda w, s: w | s, WINDOWS, SINKS),
}
MASKS = st.one_of(*KINDS.values())
EXACT = (Causal, Window, Fixed, Sinks)  # tile_visible is exact for these (and for Mask() itself)


def sized(mask, T, S, q_offset=0):
    """The mask as the engine sizes it for T queries at q_offset and S keys."""
    return mask.sized(max(T + q_offset, S), S)


def random_tiles(rng, T, S, n=300):
    """n tiles within [0, T) x [0, S), of every size from one element to the whole."""
    sizes = rng.choice([1, 2, 4, 16, 81], (2, n))
    q_lo, k_lo = rng.integers(0, T, n), rng.integers(0, S, n)
    q_hi = np.minimum(q_lo + rng.integers(0, sizes[0]), T - 1)
    k_hi = np.minimum(k_lo + rng.integers(0, sizes[1]), S - 1)
    return q_lo, q_hi, k_lo, k_hi


def truth(dense, q_lo, q_hi, k_lo, k_hi):
    """Whether each tile (row indices of `dense`) has some visible pair, and has only those."""
    parts = [dense[a : b + 1, c : d + 1] for a, b, c, d in zip(q_lo, q_hi, k_lo, k_hi, strict=True)]
    return np.array([p.any() for p in parts]), np.array([p.all() for p in parts])


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data(), T=LENGTHS, S=LENGTHS, q_offset=OFFSETS, seed=st.integers(0, 2**32 - 1))
def test_tile_answers_are_safe(kind, data, T, S, q_offset, seed):
    mask = sized(data.draw(KINDS[kind], "mask"), T, S, q_offset)
    q_lo, q_hi, k_lo, k_hi = random_tiles(np.random.default_rng(seed), T, S)
    any_, all_ = truth(mask.dense(T, S, q_offset), q_lo, q_hi, k_lo, k_hi)
    bounds = q_lo + q_offset, q_hi + q_offset, k_lo, k_hi
    visible = np.broadcast_to(mask.tile_visible(*bounds), any_.shape)
    full = np.broadcast_to(mask.tile_full(*bounds), any_.shape)
    assert not np.any(any_ & ~visible), "a tile with a visible pair was skipped"
    assert not np.any(full & ~all_), "a tile with a hidden pair was called full"
    if isinstance(mask, EXACT) or type(mask) is Mask:
        np.testing.assert_array_equal(visible, any_)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data(), T=LENGTHS, S=LENGTHS, q_offset=OFFSETS)
def test_reach_and_band_bound_the_visible_pairs(kind, data, T, S, q_offset):
    mask = sized(data.draw(KINDS[kind], "mask"), T, S, q_offset)
    q, k = np.nonzero(mask.dense(T, S, q_offset))
    q = q + q_offset
    for (behind, ahead), beyond in ((mask.reach, k >= 0), (mask.band, k >= mask.sinks)):
        if behind is not None:
            assert np.all((k >= q - behind) | ~beyond)
        if ahead is not None:
            assert np.all((k <= q + ahead) | ~beyond)


@SETTINGS
@given(MASKS, LENGTHS, LENGTHS, OFFSETS, st.data())
def test_visible_on_jax_matches_numpy(mask, T, S, q_offset, data):
    """On a fixed 80 x 80 grid (one jax compilation per op), past the sizes too."""
    mask = sized(mask, T, S, q_offset)
    q_pos, k_pos = q_offset + np.arange(80)[:, None], np.arange(80)[None, :]
    doc_len = np.asarray(data.draw(st.lists(st.integers(1, S), min_size=80, max_size=80)))
    for args in [(), (S,), (doc_len[:, None],)]:
        expected = np.broadcast_to(mask.visible(q_pos, k_pos, *args), (80, 80))
        out = mask.visible(*(jnp.asarray(x) for x in (q_pos, k_pos, *args)))
        np.testing.assert_array_equal(np.broadcast_to(np.asarray(out), (80, 80)), expected)


@SETTINGS
@given(st.one_of(WINDOWS, FIXED, BIGBIRDS, SINKS, KINDS["sinks_or_window"]), LENGTHS, LENGTHS)
def test_pairs_count_the_dense_pattern(mask, T, S):
    if getattr(mask, "causal", False):
        S = T  # causal counts are for square rows
    assert mask.pairs(T, S) == int(sized(mask, T, S).dense(T, S).sum())


@SETTINGS
@given(LENGTHS, LENGTHS)
def test_causal_pairs_are_half_the_full_count(T, S):
    assert Causal().pairs(T, S) == T * S / 2
    assert Mask().pairs(T, S) == T * S


@SETTINGS
@given(BIGBIRDS, st.integers(1, 8))
def test_causal_bigbird_keeps_the_pattern_of_a_prefix(mask, blocks):
    mask = dataclasses.replace(mask, causal=True)
    n = blocks * mask.block
    long = mask.sized(2 * n, 2 * n).dense(2 * n, 2 * n)
    np.testing.assert_array_equal(long[:n, :n], mask.sized(n, n).dense(n, n))


@SETTINGS
@given(BIGBIRDS, LENGTHS, st.integers(0, 80))
def test_noncausal_bigbird_draws_for_the_document_length(mask, L, extra):
    mask = dataclasses.replace(mask, causal=False)
    pos = np.arange(L)
    out = mask.sized(L + extra, L + extra).visible(pos[:, None], pos[None, :], doc_len=L)
    np.testing.assert_array_equal(np.broadcast_to(out, (L, L)), mask.sized(L, L).dense(L, L))


def test_block_sparse_is_hashable_and_drops_blocks_above_the_diagonal():
    table = np.ones((3, 3), bool)
    mask = BlockSparse.of(table, 4)
    assert mask == BlockSparse.of(table, 4) and hash(mask) == hash(BlockSparse.of(table, 4))
    np.testing.assert_array_equal(mask.dense(12, 12), np.tril(np.ones((12, 12), bool)))
    np.testing.assert_array_equal(BlockSparse.of(table, 4, causal=False).dense(12, 12), True)


@pytest.mark.parametrize(
    "make,option",
    [
        (lambda: Window(-1, 0), "left"),
        (lambda: Window(2, -1), "right"),
        (lambda: Window(2.5), "left"),
        (lambda: Fixed(0, 0), "block"),
        (lambda: Fixed(8, 9), "summary"),
        (lambda: Fixed(8, -1), "summary"),
        (lambda: window_extent("window", 0), "window"),
        (lambda: BlockSparse.of(np.ones((2, 2)), 0), "block"),
    ],
)
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


@pytest.mark.parametrize(
    "block,summary,segmented,tiles",
    [(128, 16, False, (128, 16)), (128, 15, False, (128, 16)), (128, 0, False, (128, 128)),
     (8, 3, False, (8, 8)), (128, 16, True, None)],
)  # fmt: skip
def test_fixed_preferred_tiles(block, summary, segmented, tiles):
    assert Fixed(block, summary).preferred_tiles(segmented) == tiles


@pytest.mark.parametrize(
    "mask,tiles",
    [(Window(3, 0), (16, 16)), (Window(63, 0), (64, 64)), (Window(40, 40), (64, 64)),
     (Window(511, 0), (64, 64)), (Causal(), None), (Mask(), None), (Sinks(4), None),
     (Window(63, 0) | Sinks(4), (64, 64)), (Fixed(32, 8) | Sinks(4), (32, 8)),
     (Causal() & Window(20, 0), (32, 32))],
)  # fmt: skip
def test_tiles_follow_the_band(mask, tiles):
    """A narrow band gets tiles about its width (16 to 64), an unbounded one the defaults;
    combined masks those of their band, or if unbounded the smallest their parts prefer."""
    assert mask.preferred_tiles(False) == tiles


def test_combinators_compose_and_name_bad_parts():
    window, sinks = Window(4, 0), Sinks(2)
    either = window | sinks
    assert isinstance(either, LogicalOr) and either.sinks == 2 and either.band == (4, 0)
    assert either.reach == (None, 0) and not either.shift_invariant
    assert (window | Window(2, 3)).shift_invariant and (window | Window(2, 3)).reach == (4, 3)
    both = either & Causal()
    np.testing.assert_array_equal(both.dense(9, 9), either.dense(9, 9))
    assert (both.sinks, both.band) == (2, (4, 0))  # the tighter part's bound
    assert either == Window(4, 0) | Sinks(2) and hash(either) == hash(Window(4, 0) | Sinks(2))
    with pytest.raises(ValueError, match="combines two or more Masks"):
        LogicalOr((window, "sinks"))
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        Sinks(-1)
