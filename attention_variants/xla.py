"""`xla`: `jax.nn.dot_product_attention`, the library baseline, behind the kernel contract.

Its implementation table: "cudnn" (GPU, cuDNN's fused kernel, `accelerators.py`: no segment ids,
offsets or lse there) before "xla" (every backend). Segment ids and offsets become the library's
boolean `mask` on the "xla" path, built from the same positions every other variant uses. The
log-sum-exp is computed beside the call: the library's `return_residual` has no gradient (jax
0.10.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_variants.accelerators import cudnn_implementation
from attention_variants.common import contract, log_sum_exp, masked_scores, offset_of, visible
from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, causal_or_full
from attention_variants.registry import Implementation, register, spec


def _plain(q, k, call) -> bool:
    """Whether the call is plain (causal or full) attention, which needs no mask array."""
    static, _ = offset_of(call.get("q_offset", 0), q.shape[0])
    return call.get("segment_ids") is None and static == 0 and q.shape[1] == k.shape[1]


def _implementations(kernels):
    @contract
    def library(q, k, v, call, options):
        causal, scale, return_lse = call["causal"], call["scale"], call["return_lse"]
        mask, lay = kernels.prepare(q, k, v, call, {})
        if _plain(q, k, call):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            vis = visible(mask, lay) if return_lse else None
        else:
            vis = jnp.broadcast_to(visible(mask, lay), (q.shape[0], q.shape[1], k.shape[1]))
            out = jax.nn.dot_product_attention(q, k, v, mask=vis[:, None], scale=scale)
            # A row that sees no key gets the library's average of all values: zero it.
            out = jnp.where(vis.any(-1)[:, :, None, None], out, 0)
        out = out.astype(q.dtype)
        if return_lse:
            return out, log_sum_exp(masked_scores(q, k, vis, scale))
        return out

    return {"cudnn": cudnn_implementation(kernels), "xla": Implementation(library)}


@register("xla", family=MaskedSoftmax(tiles=None, implementations=_implementations))
def xla(*, causal: bool) -> Mask:
    """Causal (or full) softmax through `jax.nn.dot_product_attention`."""
    return causal_or_full(causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised causal mask.
reference = spec("xla").reference
