"""`fixed`: the Sparse Transformer "fixed" pattern (Child et al. 2019).

Positions fall in blocks of `block`; query i sees, causally, every key of its own block plus
the last `summary` positions of every earlier block (the "summary" cells that carry
information across blocks). Exact softmax under the `Fixed` mask through the shared tile
engine. Query tiles are the blocks and key tiles divide both `block` and `summary`, so a
tile is either in the query's own block or holds summary keys only: only visible tiles run,
and the off-diagonal ones skip the mask. Each query sees ~block + (i / block) * summary keys,
so the cost is O(T^2 * summary / block): quadratic with a small constant, as in the paper
(block ~ sqrt(T) gives O(T sqrt(T))). With `causal=False`: the whole own block plus the
summary positions of every block, the paper's bidirectional form.
"""

from __future__ import annotations

import math

import numpy as np

from attention_variants.common import check_inputs, masked_reference, softmax_flops
from attention_variants.masks import Fixed
from attention_variants.registry import register
from attention_variants.tiled import BlockSizes, tiled_attention

BLOCK, SUMMARY = 128, 16  # the paper's l=128 with c in {8, 16, 32}


def fixed_mask(causal=True, *, block=BLOCK, summary=SUMMARY, **_) -> Fixed:
    return Fixed(block, summary, causal)


def plan(T: int, S: int, causal=True, *, block, summary, block_q, block_k):
    """The mask and tiles the kernel runs; tiles default to block_q = block and block_k the
    largest divisor of both block and summary, so a key tile is own-block or summary only."""
    mask = Fixed(block, summary, causal)
    bq = block if block_q is None else block_q
    bk = math.gcd(block, summary) if block_k is None else block_k
    return mask, BlockSizes(bq, bk)


def check(**options) -> None:
    plan(1, 1, **options)


def fixed_pairs(T: int, S: int, block: int, summary: int, causal: bool = True) -> int:
    """Visible pairs of `Fixed(block, summary, causal)`, counted per query row in closed form."""
    i = np.arange(T, dtype=np.int64)
    m = i // block
    if causal:  # own block up to i, plus `summary` keys of each earlier (complete) block
        return int((i % block + 1 + m * summary).sum())

    def summaries(n):  # summary positions among the first n of a block
        return np.maximum(n - (block - summary), 0)

    own = np.clip(S - m * block, 0, block)  # keys of the query's own block
    total = (S // block) * summary + summaries(S % block)
    return int((own + total - summaries(own)).sum())


def flops(B, T, S, N, H, *, causal=True, block=BLOCK, summary=SUMMARY, **_) -> float:
    return softmax_flops(B, N, H, fixed_pairs(T, S, block, summary, causal))


def reference(q, k, v, *, causal=True, segment_ids=None, scale=None, block=BLOCK, summary=SUMMARY):
    """Softmax attention under the explicit [T, S] fixed-pattern mask."""
    mask = Fixed(block, summary, causal)
    return masked_reference(mask, q, k, v, causal, segment_ids, scale)


@register(
    "fixed",
    exact=True,
    reference=reference,
    flops=flops,
    check=check,
    mask=fixed_mask,
    examples=(
        {"block": 8, "summary": 2},
        {"block": 4, "summary": 1, "block_q": 8, "block_k": 4},
        {"block": 16, "summary": 3, "block_q": 8, "block_k": 8},
        {"block": 8, "summary": 8},
    ),
)
def fixed(
    q,
    k,
    v,
    *,
    causal=True,
    segment_ids=None,
    scale=None,
    block=BLOCK,
    summary=SUMMARY,
    block_q=None,
    block_k=None,
):
    """Softmax attention under the fixed pattern; tile sizes default to the aligned ones."""
    check_inputs(q, k, v, segment_ids, causal)
    T, S = q.shape[1], k.shape[1]
    opts = dict(block=block, summary=summary, block_q=block_q, block_k=block_k)
    mask, tiles = plan(T, S, causal, **opts)
    return tiled_attention(q, k, v, mask, segment_ids=segment_ids, scale=scale, block_sizes=tiles)
