"""Mask predicates: the tile answers agree with `dense` (exact, or conservative where allowed)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attention_variants.bigbird import BigBird
from attention_variants.masks import BlockSparse, Causal, Fixed, Mask, Window

T, S = 70, 70

MASKS = [
    Mask(),
    Causal(),
    Window(1),
    Window(9),
    Window(9, causal=False),
    Window(100),
    Fixed(8, 2),
    Fixed(8, 0),
    Fixed(8, 8),
    Fixed(7, 3, causal=False),
    Fixed(16, 5),
    BigBird(4, 2, 1, 2).at(T, S),
    BigBird(5, 3, 2, 1, seed=1, causal=False).at(T, S),
    BigBird(8, 1, 0, 3, seed=2).at(T, S),
]
EXACT = (Causal, Window, Fixed)  # tile_visible exact for any tiles


def random_tiles(seed, n=3000):
    rng = np.random.default_rng(seed)
    q = np.sort(rng.integers(0, T, (2, n)), axis=0)
    k = np.sort(rng.integers(0, S, (2, n)), axis=0)
    return q[0], q[1], k[0], k[1]


def truth(dense, q_lo, q_hi, k_lo, k_hi):
    """Whether each tile has some visible pair, and whether all its pairs are visible."""
    parts = [dense[a : b + 1, c : d + 1] for a, b, c, d in zip(q_lo, q_hi, k_lo, k_hi, strict=True)]
    return np.array([p.any() for p in parts]), np.array([p.all() for p in parts])


@pytest.mark.parametrize("mask", MASKS, ids=repr)
def test_tile_answers_are_safe(mask):
    bounds = random_tiles(hash(repr(mask)) % 1000)
    any_, all_ = truth(mask.dense(T, S), *bounds)
    visible = np.broadcast_to(mask.tile_visible(*bounds), any_.shape)
    full = np.broadcast_to(mask.tile_full(*bounds), any_.shape)
    assert not np.any(any_ & ~visible), "a tile with a visible pair was skipped"
    assert not np.any(full & ~all_), "a tile with a hidden pair was called full"
    if isinstance(mask, EXACT):
        np.testing.assert_array_equal(visible, any_)


@pytest.mark.parametrize("mask", [m for m in MASKS if isinstance(m, (Fixed, BlockSparse))])
def test_aligned_tiles_are_exact(mask):
    """Tiles aligned with the pattern: both answers exact (no tile computed or masked in vain)."""
    b = mask.block
    bk = b if isinstance(mask, BlockSparse) else max(np.gcd(b, mask.summary), 1)
    q_lo = np.arange(0, T, b)[:, None]
    k_lo = np.arange(0, S, bk)[None, :]
    q_hi, k_hi = np.minimum(q_lo + b, T) - 1, np.minimum(k_lo + bk, S) - 1
    dense = mask.dense(T, S)
    bounds = [np.broadcast_to(x, (q_lo.size, k_lo.size)).ravel() for x in (q_lo, q_hi, k_lo, k_hi)]
    any_, all_ = truth(dense, *bounds)
    np.testing.assert_array_equal(np.broadcast_to(mask.tile_visible(*bounds), any_.shape), any_)
    np.testing.assert_array_equal(np.broadcast_to(mask.tile_full(*bounds), all_.shape), all_)


@pytest.mark.parametrize("mask", MASKS[1:], ids=repr)
def test_visible_on_jax_tiles_matches_numpy(mask):
    q_pos, k_pos = np.arange(T)[:, None], np.arange(S)[None, :]
    out = mask.visible(jnp.asarray(q_pos), jnp.asarray(k_pos))
    np.testing.assert_array_equal(np.asarray(out), mask.visible(q_pos, k_pos))


def test_block_sparse_is_hashable_and_drops_blocks_above_the_diagonal():
    table = np.ones((3, 3), bool)
    mask = BlockSparse.of(table, 4)
    assert mask == BlockSparse.of(table, 4) and hash(mask) == hash(BlockSparse.of(table, 4))
    np.testing.assert_array_equal(mask.dense(12, 12), np.tril(np.ones((12, 12), bool)))
    np.testing.assert_array_equal(BlockSparse.of(table, 4, causal=False).dense(12, 12), True)


@pytest.mark.parametrize(
    "make,option",
    [
        (lambda: Window(0), "window"),
        (lambda: Window(2.5), "window"),
        (lambda: Fixed(0, 0), "block"),
        (lambda: Fixed(8, 9), "summary"),
        (lambda: Fixed(8, -1), "summary"),
        (lambda: BlockSparse.of(np.ones((2, 2)), 0), "block"),
    ],
)
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_bigbird_pattern_needs_lengths():
    with pytest.raises(NotImplementedError, match="at"):
        BigBird().visible(np.arange(3), np.arange(3))
