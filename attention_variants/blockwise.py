"""`blockwise`: flash-style tiled attention in pure JAX, O(T) memory forward and backward.

FlashAttention (Dao et al. 2022) / Rabe & Staats 2021: query tiles x key tiles with an online
softmax; causal tiles above the diagonal are skipped. The engine lives in `tiled.py`; its
reference is `dense` (materialised scores under the same causal mask).
"""

from __future__ import annotations

from attention_variants.common import check_inputs
from attention_variants.dense import causal_mask, reference, softmax_flops_causal
from attention_variants.masks import causal_or_full
from attention_variants.registry import register
from attention_variants.tiled import BlockSizes, tiled_attention

DEFAULTS = BlockSizes()


def check(*, block_q, block_k):
    BlockSizes(block_q, block_k)


@register(
    "blockwise",
    exact=True,
    reference=reference,
    flops=softmax_flops_causal,
    check=check,
    linear_in_length=True,
    mask=causal_mask,
    examples=({"block_q": 16, "block_k": 8}, {"block_q": 8, "block_k": 32}),
)
def blockwise(
    q,
    k,
    v,
    *,
    causal=True,
    segment_ids=None,
    scale=None,
    block_q=DEFAULTS.block_q,
    block_k=DEFAULTS.block_k,
):
    """Tiled softmax attention; tiles that no query can see are never computed."""
    check_inputs(q, k, v, segment_ids, causal)
    return tiled_attention(
        q,
        k,
        v,
        causal_or_full(causal),
        segment_ids=segment_ids,
        scale=scale,
        block_sizes=BlockSizes(block_q, block_k),
    )
