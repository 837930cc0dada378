"""`dense`: the reference softmax attention, which materialises the [B, N, T, S] scores."""

from __future__ import annotations

from attention_variants.common import (
    causal_pairs,
    masked_reference,
    softmax_flops,
)
from attention_variants.masks import causal_or_full
from attention_variants.registry import register


def softmax_flops_causal(B, T, S, N, H, *, causal=True, **_):
    """Useful forward FLOPs of causal (half of T*S) or full softmax attention."""
    return softmax_flops(B, N, H, causal_pairs(T, S, causal))


def causal_mask(causal=True, **_):
    return causal_or_full(causal)


def reference(q, k, v, *, causal=True, segment_ids=None, scale=None):
    """Softmax attention under an explicit [T, S] causal mask (einsum, float32 statistics)."""
    return masked_reference(causal_or_full(causal), q, k, v, causal, segment_ids, scale)


@register("dense", exact=True, reference=reference, flops=softmax_flops_causal, mask=causal_mask)
def dense(q, k, v, *, causal=True, segment_ids=None, scale=None):
    """Softmax attention with materialised scores (Vaswani et al. 2017): the baseline math."""
    return reference(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)
