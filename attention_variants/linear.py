"""`linear`: kernelised linear attention with phi(x) = elu(x) + 1.

Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention": out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s), O(T) in time and
memory. Causal runs chunk by chunk with a carried float32 state (`chunked.py`); non-causal uses
global sums; `linear_step` is the same causal recurrence one token at a time, for decoding.

`scale` is accepted for the contract and not used: the feature map is the paper's, on q and k
as given (elu(x) + 1 is not homogeneous, so a logit scale has no exact counterpart here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_variants.chunked import (
    Chunking,
    State,
    chunked_flops,
    init_state,
    linear_attention,
    linear_attention_reference,
    recurrent_step,
)
from attention_variants.common import check_inputs
from attention_variants.dense import causal_mask
from attention_variants.registry import register

DEFAULTS = Chunking()


def feature_map(x):
    """phi(x) = elu(x) + 1 > 0, in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def check(*, chunk):
    Chunking(chunk)


def flops(B, T, S, N, H, *, causal=True, chunk=DEFAULTS.chunk, **_):
    """Matmul FLOPs of the chunked algorithm with F = H features (see `chunked_flops`)."""
    return chunked_flops(B, T, S, N, H, causal=causal, features=H, chunk=chunk)


def reference(q, k, v, *, causal=True, segment_ids=None, scale=None):
    """The explicit sums over an explicit [T, S] mask, float32."""
    check_inputs(q, k, v, segment_ids, causal)
    phi_q, phi_k = feature_map(q), feature_map(k)
    out = linear_attention_reference(phi_q, phi_k, v, causal=causal, segment_ids=segment_ids)
    return out.astype(q.dtype)


@register(
    "linear",
    exact=False,
    reference=reference,
    flops=flops,
    check=check,
    linear_in_length=True,
    mask=causal_mask,
    examples=({"chunk": 8}, {"chunk": 13}),
)
def linear(q, k, v, *, causal=True, segment_ids=None, scale=None, chunk=DEFAULTS.chunk):
    """Linear attention (elu + 1 features); causal in chunks of `chunk` positions."""
    check_inputs(q, k, v, segment_ids, causal)
    check(chunk=chunk)
    out = linear_attention(
        feature_map(q), feature_map(k), v, causal=causal, segment_ids=segment_ids, chunk=chunk
    )
    return out.astype(q.dtype)


def linear_init_state(batch: int, kv_heads: int, head_dim: int) -> State:
    """The empty decoding state: kv [B, K, H, H+1] float32 (sum phi(k) [v, 1]^T)."""
    return init_state(batch, kv_heads, head_dim, head_dim)


def linear_step(state: State, q, k, v):
    """Decodes one token: q [B, N, H], k, v [B, K, H] -> (out [B, N, H], new state).

    Feeding a sequence token by token gives the causal `linear` output (up to rounding).
    """
    out, state = recurrent_step(state, feature_map(q), feature_map(k), v)
    return out.astype(q.dtype), state
