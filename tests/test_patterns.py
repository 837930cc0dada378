"""Attention patterns of the sparse variants, pinned to their papers with hand-written sets.

Each kernel is a black box: with v = identity, out[i, j] is the softmax weight of key j for
query i, so the visible set is read off the output (`pattern`). Expected sets are literal
strings or a few lines of plain Python straight from each paper's definition, never the
repo's mask classes:

* sliding_window: local attention of Longformer (Beltagy et al. 2020) and Mistral 7B (Jiang et
  al. 2023); key j visible to query i iff i - left <= j <= i + right, an int W meaning
  (W - 1, 0): W keys, the query included.
* fixed: the "fixed" pattern of Sparse Transformers (Child et al. 2019, section 4.2):
  A1(i) = {j : floor(j / l) = floor(i / l)}, A2(i) = {j : j mod l >= l - c}.
* bigbird: BigBird (Zaheer et al. 2020): blocks of b, a window of (left, right) blocks, the
  first g blocks global (seeing and seen by all), plus r random key blocks per query block.

causal=True also requires j <= i. With packed segment_ids every pattern is laid on the
positions within each document. Each kernel call compiles once (~0.5 s on CPU), so the cases
are few and packed layouts share one batched call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def pattern(name, T, *, causal, S=None, segment_ids=None, weights=False, eager=False, **options):
    """bool [T, S]: which keys each query sees, read off the jitted kernel (eager if `eager`).

    `segment_ids`, a list of B rows, gives [B, T, S]; `weights` the float weights instead.
    """
    S = T if S is None else S
    B = 1 if segment_ids is None else len(segment_ids)
    rng = np.random.default_rng(0)  # numpy inputs: jax.random would compile per shape
    q = 0.1 * rng.standard_normal((B, T, 1, S), np.float32)
    k = 0.1 * rng.standard_normal((B, S, 1, S), np.float32)
    v = np.broadcast_to(np.eye(S, dtype=np.float32)[:, None, :], (B, S, 1, S))  # e_j at j
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    fn = av.get(name, **options)
    if not eager:  # unoptimised machine code: the tiny kernels compile ~35% faster
        fn = jax.jit(fn, static_argnames="causal", compiler_options=FAST_COMPILE)
    out = np.asarray(fn(q, k, v, causal=causal, segment_ids=seg))[:, :, 0]
    out = out if weights else out > 1e-12
    return out[0] if segment_ids is None else out


def literal(*rows: str) -> np.ndarray:
    """bool matrix from rows such as "11.1": "1" visible, "." not."""
    return np.array([[c == "1" for c in row] for row in rows])


def window_set(T, left, right, causal, S=None):
    i, j = np.arange(T)[:, None], np.arange(T if S is None else S)[None, :]
    return (i - left <= j) & (j <= i + right) & ((j <= i) | (not causal))


def fixed_set(T, l, c, causal):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return ((j // l == i // l) | (j % l >= l - c)) & ((j <= i) | (not causal))


def bigbird_set(T, b, left, right, g, causal):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    A, Bk = i // b, j // b
    near = (A - left <= Bk) & (Bk <= A + right)
    return (near | (A < g) | (Bk < g)) & ((j <= i) | (not causal))


# Sliding window ---------------------------------------------------------------------------

W3 = literal(
    "1.......",
    "11......",
    "111.....",
    ".111....",
    "..111...",
    "...111..",
    "....111.",
    ".....111",
)
W21 = literal(
    "11......",
    "111.....",
    "1111....",
    ".1111...",
    "..1111..",
    "...1111.",
    "....1111",
    ".....111",
)
W10 = literal(
    "1.......",
    "11......",
    ".11.....",
    "..11....",
    "...11...",
    "....11..",
    ".....11.",
    "......11",
)
TILES = [dict(block_q=4, block_k=4), dict(block_q=2, block_k=8)]


@pytest.mark.parametrize(
    "window,causal,expected,tiles",
    [
        (3, True, W3, TILES[0]),
        (3, False, W3, TILES[1]),  # the int means (2, 0) without causality too: it looks back
        ((2, 1), False, W21, TILES[0]),
        ((1, 2), True, W10, TILES[1]),  # the right part is clipped by causality
    ],
    ids=["3-causal", "3", "(2,1)", "(1,2)-causal"],
)
def test_sliding_window_literal(window, causal, expected, tiles):
    got = pattern("sliding_window", 8, causal=causal, window=window, **tiles)
    np.testing.assert_array_equal(got, expected)


def test_row_that_sees_no_key_is_zero():
    # Cross-attention, S < T, partial last tiles: queries 7..9 see [i - 2, i + 1], past key 4.
    out = pattern("sliding_window", 10, S=5, causal=False, window=(2, 1), weights=True, **TILES[0])
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[7:], 0.0)
    np.testing.assert_allclose(out[:7].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out > 1e-12, window_set(10, 2, 1, False, S=5))


# Fixed (Sparse Transformer) ---------------------------------------------------------------

FIXED_4_1_CAUSAL = literal(
    "1...........",
    "11..........",
    "111.........",
    "1111........",
    "...11.......",
    "...111......",
    "...1111.....",
    "...11111....",
    "...1...11...",
    "...1...111..",
    "...1...1111.",
    "...1...11111",
)
FIXED_4_1 = literal(*["1111...1...1"] * 4, *["...11111...1"] * 4, *["...1...11111"] * 4)


@pytest.mark.parametrize(
    "causal,expected", [(True, FIXED_4_1_CAUSAL), (False, FIXED_4_1)], ids=["causal", "full"]
)
def test_fixed_literal(causal, expected):
    np.testing.assert_array_equal(pattern("fixed", 12, causal=causal, block=4, summary=1), expected)


@pytest.mark.parametrize(
    "block,summary,causal,tiles",
    [
        (4, 2, False, {}),
        (4, 0, True, dict(block_q=2, block_k=2)),
    ],
)
def test_fixed_formula(block, summary, causal, tiles):
    got = pattern("fixed", 12, causal=causal, block=block, summary=summary, **tiles)
    np.testing.assert_array_equal(got, fixed_set(12, block, summary, causal))


# BigBird ----------------------------------------------------------------------------------

BIGBIRD_BLOCKS = literal(  # 8 blocks of 2: block 0 global, window one block either side
    "11111111",
    "111.....",
    "1111....",
    "1.111...",
    "1..111..",
    "1...111.",
    "1....111",
    "1.....11",
)
BB = dict(block=2, window=(1, 1), num_global=1)


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_literal(causal):
    expected = np.kron(BIGBIRD_BLOCKS, np.ones((2, 2), bool))
    if causal:
        expected &= np.tri(16, dtype=bool)  # element-wise: diagonal blocks are triangles
    got = pattern("bigbird", 16, causal=causal, num_random=0, **BB)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(expected, bigbird_set(16, 2, 1, 1, 1, causal))


@pytest.mark.parametrize(
    "window,left,right,causal", [(3, 2, 0, False), ((2, 1), 2, 1, False)], ids=["3", "(2,1)"]
)
def test_bigbird_window_forms(window, left, right, causal):
    got = pattern("bigbird", 16, causal=causal, block=2, window=window, num_global=1, num_random=0)
    np.testing.assert_array_equal(got, bigbird_set(16, 2, left, right, 1, causal))


def test_bigbird_random_blocks():
    r = 3
    got = pattern("bigbird", 32, causal=True, num_random=r, seed=0, **BB)
    base = bigbird_set(32, 2, 1, 1, 1, True)
    assert np.all(got >= base), "random blocks replace window or global ones"
    extra = (got & ~base).reshape(16, 2, 16, 2).any(axis=(1, 3))  # [query block, key block]
    full = got.reshape(16, 2, 16, 2).all(axis=(1, 3))
    assert np.all(full[extra]), "a random key block is seen only in part"
    assert not np.any(np.triu(extra)), "a random key block at or after the query block"
    base_blocks = base.reshape(16, 2, 16, 2).any(axis=(1, 3))
    free = np.tril(~base_blocks).sum(1)  # key blocks at or before the row, not yet visible
    np.testing.assert_array_equal(extra.sum(1), np.minimum(r, free) * (np.arange(16) >= 1))
    # Deterministic for a seed and independent of T under causality (a fresh build for the
    # prefix draws the same blocks); changed by the seed.
    prefix = pattern("bigbird", 16, causal=True, num_random=r, seed=0, **BB)
    np.testing.assert_array_equal(prefix, got[:16, :16])
    other = pattern("bigbird", 32, causal=True, num_random=r, seed=1, **BB)
    assert not np.array_equal(other, got), "the seed does not change the draws"


# Packed documents -------------------------------------------------------------------------


def packed(layouts, doc_set):
    """[B, T, T] block-diagonal unions of doc_set(L) over documents of lengths L, one batch row
    per layout, and the segment ids of the rows."""
    T = sum(layouts[0])
    out, ids = np.zeros((len(layouts), T, T), bool), []
    for row, lengths in enumerate(layouts):
        ids.append([n for n, L in enumerate(lengths) for _ in range(L)])
        at = 0
        for L in lengths:
            out[row, at : at + L, at : at + L] = doc_set(L)
            at += L
    return out, ids


LAYOUTS = [(5, 3, 8), (3, 5, 8)]  # document lengths in T = 16: not aligned to blocks or tiles
PACKED = {
    "window": ("sliding_window", dict(window=(2, 1), **TILES[1]), (2, 1), window_set),
    "fixed": ("fixed", dict(block=4, summary=1), (4, 1), fixed_set),
    "bigbird": ("bigbird", dict(num_random=0, **BB), (2, 1, 1, 1), bigbird_set),
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", PACKED)
def test_packed_pattern_is_per_document(case, causal):
    name, options, args, doc_set = PACKED[case]
    expected, ids = packed(LAYOUTS, lambda L: doc_set(L, *args, causal))
    got = pattern(name, 16, causal=causal, segment_ids=ids, **options)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_bigbird_random_equals_documents_alone(causal):
    options = dict(num_random=1, seed=3, **BB)
    alone = pattern("bigbird", 7, causal=causal, **options)  # 4 blocks: room for random ones
    assert not np.array_equal(alone, bigbird_set(7, 2, 1, 1, 1, causal)), "no random block"
    expected, ids = packed([(7, 7)], lambda L: alone)  # the second document starts mid-block
    got = pattern("bigbird", 14, causal=causal, segment_ids=ids, **options)
    np.testing.assert_array_equal(got, expected)


def test_eager_pattern():  # the other tests run the kernels under jit
    expected, ids = packed(LAYOUTS, lambda L: bigbird_set(L, 2, 1, 1, 1, True))
    got = pattern("bigbird", 16, causal=True, segment_ids=ids, eager=True, num_random=0, **BB)
    np.testing.assert_array_equal(got, expected)
