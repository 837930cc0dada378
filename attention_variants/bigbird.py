"""`bigbird`: block-sparse attention with window, global and random blocks (Zaheer et al. 2020).

Positions fall in blocks of `block`. Query block a sees key block b when
  * b is in its window: a - window < b <= a (|a - b| < window with `causal=False`);
  * a or b is among the first `num_global` blocks (global blocks see and are seen by all);
  * b is one of `num_random` blocks drawn for row a from those it does not already see,
    with a generator seeded by (`seed`, a): deterministic, and independent of T when causal,
    so extending a sequence keeps the pattern of its prefix;
and, when causal, b <= a with j <= i inside the diagonal block. The pattern lives in a
block-level table (`BlockSparse`); the random draws depend on the number of blocks, so the
kernel builds the table per call from the static shapes. Tiles are the blocks themselves, so
the engine computes exactly the visible blocks and masks only the diagonal ones: the cost is
O(T * block * (window + num_global + num_random)), linear in T at fixed block counts.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attention_variants.common import check_inputs, masked_reference, softmax_flops
from attention_variants.masks import BlockSparse, Mask, check_int
from attention_variants.registry import register
from attention_variants.tiled import BlockSizes, tiled_attention

BLOCK, WINDOW, GLOBAL, RANDOM = 64, 3, 2, 3  # the paper's ITC setting (block 64, 3/2/3 blocks)


@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
    """The BigBird pattern's options; `at(T, S)` gives its `BlockSparse` mask for those lengths."""

    block: int = BLOCK
    window: int = WINDOW
    num_global: int = GLOBAL
    num_random: int = RANDOM
    seed: int = 0
    causal: bool = True

    def __post_init__(self):
        check_int("block", self.block)
        check_int("window", self.window)
        check_int("num_global", self.num_global, 0)
        check_int("num_random", self.num_random, 0)
        check_int("seed", self.seed, 0)

    def blocks(self, nq: int, nk: int) -> np.ndarray:
        """bool [nq, nk]: which key blocks each query block sees."""
        a, b = np.arange(nq)[:, None], np.arange(nk)[None, :]
        if self.causal:
            allowed, near = b <= a, b > a - self.window
        else:
            allowed, near = np.ones((nq, nk), bool), abs(a - b) < self.window
        seen = (near | (a < self.num_global) | (b < self.num_global)) & allowed
        for row in range(self.num_global, nq):
            free = np.flatnonzero(allowed[row] & ~seen[row])
            draw = np.random.default_rng((self.seed, row)).permutation(free)
            seen[row, draw[: self.num_random]] = True
        return seen

    def at(self, T: int, S: int) -> BlockSparse:
        return _block_mask(self, T, S)

    def dense(self, T: int, S: int) -> np.ndarray:
        return self.at(T, S).dense(T, S)

    def _needs_lengths(self, *_):
        raise NotImplementedError("BigBird's random blocks depend on the lengths: use .at(T, S)")

    visible = tile_visible = tile_full = _needs_lengths


@functools.lru_cache(maxsize=64)
def _block_mask(pattern: BigBird, T: int, S: int) -> BlockSparse:
    nq, nk = -(-T // pattern.block), -(-S // pattern.block)
    return BlockSparse.of(pattern.blocks(nq, nk), pattern.block, pattern.causal)


def bigbird_mask(
    causal=True, *, block=BLOCK, window=WINDOW, num_global=GLOBAL, num_random=RANDOM, seed=0, **_
) -> BigBird:
    return BigBird(block, window, num_global, num_random, seed, causal)


def plan(T: int, S: int, causal=True, **options) -> tuple[BlockSparse, BlockSizes]:
    """The mask for these lengths and the tiles the kernel runs: one tile per block."""
    pattern = bigbird_mask(causal, **options)
    return pattern.at(T, S), BlockSizes(pattern.block, pattern.block)


def check(**options) -> None:
    bigbird_mask(**options)


def block_pairs(mask: BlockSparse, T: int, S: int) -> int:
    """Visible pairs of a block-sparse mask from its table: sizes of the visible blocks."""
    b = mask.block
    size_q = np.minimum(T - np.arange(mask.shape[0]) * b, b).astype(np.float64)
    size_k = np.minimum(S - np.arange(mask.shape[1]) * b, b).astype(np.float64)
    pairs = size_q @ mask.table @ size_k
    if mask.causal:  # the diagonal blocks are triangles, not squares
        diag = np.diagonal(mask.table) * size_q[: min(mask.shape)]
        pairs -= (diag * (diag - 1) / 2).sum()
    return int(pairs)


def flops(B, T, S, N, H, *, causal=True, **options) -> float:
    mask = bigbird_mask(causal, **options).at(T, S)
    return softmax_flops(B, N, H, block_pairs(mask, T, S))


def reference(
    q,
    k,
    v,
    *,
    causal=True,
    segment_ids=None,
    scale=None,
    block=BLOCK,
    window=WINDOW,
    num_global=GLOBAL,
    num_random=RANDOM,
    seed=0,
):
    """Softmax attention under the explicit [T, S] BigBird mask."""
    mask = BigBird(block, window, num_global, num_random, seed, causal)
    return masked_reference(mask, q, k, v, causal, segment_ids, scale)


@register(
    "bigbird",
    exact=True,
    reference=reference,
    flops=flops,
    check=check,
    linear_in_length=True,
    mask=bigbird_mask,
    examples=(
        {"block": 4, "window": 4, "num_global": 1, "num_random": 2},
        {"block": 8, "window": 2, "num_global": 2, "num_random": 1, "seed": 3},
        {"block": 16, "window": 1, "num_global": 1, "num_random": 1},
        {"block": 2, "window": 8, "num_global": 3, "num_random": 3, "seed": 7},
    ),
)
def bigbird(
    q,
    k,
    v,
    *,
    causal=True,
    segment_ids=None,
    scale=None,
    block=BLOCK,
    window=WINDOW,
    num_global=GLOBAL,
    num_random=RANDOM,
    seed=0,
):
    """Block-sparse softmax attention; tiles are the blocks, only visible ones are computed."""
    check_inputs(q, k, v, segment_ids, causal)
    T, S = q.shape[1], k.shape[1]
    opts = dict(block=block, window=window, num_global=num_global, num_random=num_random)
    mask, tiles = plan(T, S, causal, seed=seed, **opts)
    return tiled_attention(q, k, v, mask, segment_ids=segment_ids, scale=scale, block_sizes=tiles)
