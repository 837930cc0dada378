"""`blockwise`: flash-style tiled attention in pure JAX, O(T) memory forward and backward.

FlashAttention (Dao et al. 2022) / Rabe & Staats 2021: query tiles x key tiles with an online
softmax; causal tiles above the diagonal are skipped. The engine lives in `tiled.py`; the
reference is the plain softmax under the same causal mask.
"""

from __future__ import annotations

from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, causal_or_full
from attention_variants.registry import register, spec
from attention_variants.tiled import BlockSizes


@register(
    "blockwise",
    family=MaskedSoftmax(tiles=BlockSizes()),
    long_context=True,
    test_options=({"block_q": 16, "block_k": 8}, {"block_q": 8, "block_k": 32}),
)
def blockwise(*, causal: bool) -> Mask:
    """Causal (or full) attention, tile by tile."""
    return causal_or_full(causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised causal mask.
reference = spec("blockwise").reference
