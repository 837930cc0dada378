"""`xla`: `jax.nn.dot_product_attention`, the library baseline, behind the kernel contract.

Its implementation table: "cudnn" (GPU, cuDNN's fused kernel: no segment ids, offsets or lse
there) before "xla" (every backend). Segment ids and offsets become the library's boolean
`mask` on the "xla" path, built from the same positions every other variant uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_variants.common import visible
from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, causal_or_full
from attention_variants.registry import Implementation, register


def _plain(q, k, call) -> bool:
    """Whether the call is plain (causal or full) attention, which needs no mask array."""
    offset = call.get("q_offset", 0)
    no_offset = isinstance(offset, int) and offset == 0
    return call.get("segment_ids") is None and no_offset and (q.shape[1] == k.shape[1])


def _implementations(kernels):
    def library(implementation: str):
        def fn(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, q_offset=0,
               scale=None, return_lse=False):  # fmt: skip
            call = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                        q_offset=q_offset)  # fmt: skip
            mask, lay = kernels.prepare(q, k, v, call, {})
            if _plain(q, k, call) or (implementation == "cudnn"):
                out = jax.nn.dot_product_attention(
                    q, k, v, scale=scale, is_causal=causal, implementation=implementation
                )
                return out.astype(q.dtype)
            vis = jnp.broadcast_to(visible(mask, lay), (q.shape[0], q.shape[1], k.shape[1]))
            out = jax.nn.dot_product_attention(
                q, k, v, scale=scale, mask=vis[:, None], implementation=implementation
            )  # a row that sees no key gets the library's average of all values: zero it
            return jnp.where(vis.any(-1)[:, :, None, None], out, 0).astype(q.dtype)

        return fn

    def cudnn_supports(q, k, v, *, return_lse=False, **call):
        if return_lse:
            return "return_lse"
        if not _plain(q, k, call):
            return "segment_ids, q_offset or T != S (cuDNN's public API takes no mask here)"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"{q.dtype} inputs (cuDNN's flash kernel takes bfloat16 or float16)"
        return None

    def xla_supports(q, k, v, *, return_lse=False, **call):
        return "return_lse" if return_lse else None

    return {
        "cudnn": Implementation(library("cudnn"), ("gpu",), cudnn_supports),
        "xla": Implementation(library("xla"), supports=xla_supports),
    }


@register("xla", family=MaskedSoftmax(tiles=None, implementations=_implementations))
def xla(*, causal: bool) -> Mask:
    """Causal (or full) softmax through `jax.nn.dot_product_attention`."""
    return causal_or_full(causal)
