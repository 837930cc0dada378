"""`dense`: the reference softmax attention, which materialises the [B, N, T, S] scores."""

from __future__ import annotations

from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, causal_or_full
from attention_variants.registry import Implementation, register, spec


def _materialised(kernels):
    return {"jax": Implementation(kernels.reference)}


@register("dense", family=MaskedSoftmax(tiles=None, implementations=_materialised))
def dense(*, causal: bool) -> Mask:
    """Softmax attention with materialised scores (Vaswani et al. 2017): the baseline math."""
    return causal_or_full(causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# the same function: it materialises the scores.
reference = spec("dense").reference
