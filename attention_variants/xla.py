"""`xla`: `jax.nn.dot_product_attention`, the library baseline, behind the kernel contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_variants.common import check_inputs, segment_mask
from attention_variants.dense import causal_mask, reference, softmax_flops_causal
from attention_variants.registry import register

IMPLEMENTATIONS = ("xla", "cudnn")


def check(*, implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


@register(
    "xla",
    exact=True,
    reference=reference,
    flops=softmax_flops_causal,
    check=check,
    mask=causal_mask,
)
def xla(q, k, v, *, causal=True, segment_ids=None, scale=None, implementation="xla"):
    """`jax.nn.dot_product_attention`; segment_ids become its boolean `mask` (xla backend).

    cuDNN takes no arbitrary mask, so segment_ids with implementation="cudnn" raise
    NotImplementedError. Under the causal and segment masks every row sees at least itself,
    so the library's behaviour on rows that see no key never arises here.
    """
    check(implementation=implementation)
    check_inputs(q, k, v, segment_ids, causal)
    mask = None
    if segment_ids is not None:
        if implementation == "cudnn":
            raise NotImplementedError(
                "xla variant: segment_ids are not supported with implementation='cudnn'; "
                "use implementation='xla'"
            )
        mask = segment_mask(segment_ids)  # [B, 1, T, T]; always sees itself, so no empty row
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=causal, implementation=implementation
    ).astype(jnp.result_type(q))
