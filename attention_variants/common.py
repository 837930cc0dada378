"""Shared pieces of the kernel contract: input checks, the default scale, FLOP counts."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from attention_variants.masks import Mask, check_int


def check_inputs(q, k, v, segment_ids=None, causal: bool = False) -> None:
    """Raises ValueError naming the dimensions when q, k, v, segment_ids break the contract."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T|S, heads, H] (rank 4), got shape {x.shape}")
    B, T, N, H = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have equal shapes [B, S, K, H], got {k.shape} and {v.shape}"
        )
    Bk, S, K, Hk = k.shape
    if Bk != B:
        raise ValueError(f"batch B differs: q has B={B}, k/v have B={Bk}")
    if Hk != H:
        raise ValueError(f"head dim H differs: q has H={H}, k/v have H={Hk}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")
    if causal and T != S:
        raise ValueError(f"causal attention needs T == S, got T={T}, S={S}")
    if segment_ids is not None:
        if T != S:
            raise ValueError(f"segment_ids needs self-attention (T == S), got T={T}, S={S}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_positive(**values) -> None:
    """Raises ValueError naming each option that is not a positive int."""
    for name, value in values.items():
        check_int(name, value)


def visible_pairs(mask: Mask, T: int, S: int, rows: int = 2048) -> int:
    """Number of visible (query, key) pairs under `mask`, counted in row chunks."""
    total = 0
    k_pos = np.arange(S)[None, :]
    for lo in range(0, T, rows):
        q_pos = np.arange(lo, min(lo + rows, T))[:, None]
        total += int(np.count_nonzero(np.broadcast_to(mask.visible(q_pos, k_pos), (len(q_pos), S))))
    return total


def softmax_flops(B: int, N: int, H: int, pairs: float) -> float:
    """Useful forward FLOPs of softmax attention: QK^T and PV, 2 each per multiply-add."""
    return 4.0 * B * N * H * pairs


def causal_pairs(T: int, S: int, causal: bool) -> float:
    """Visible pairs for causal or full attention (DESIGN.md: causal is half of T*S)."""
    return T * S / 2 if causal else T * S


def segment_mask(segment_ids):
    """[B, T] ids -> [B, 1, T, T] boolean: a query sees only keys of its own segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def softmax_attention(q, k, v, *, mask=None, segment_ids=None, scale=None):
    """Plain softmax attention that materialises the [B, N, T, S] scores (the reference math).

    mask: optional bool [T, S] (True = visible). Rows that see no key return zeros.
    Softmax statistics are float32; the output has q's dtype.
    """
    check_inputs(q, k, v, segment_ids)
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = default_scale(scale, H)
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.ones((1, 1, T, k.shape[1]), bool)
    if mask is not None:
        visible = visible & jnp.asarray(mask)[None, None]
    if segment_ids is not None:
        visible = visible & segment_mask(segment_ids)
    visible = visible[:, :, None]  # [B|1, 1, 1, T, S]
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def masked_reference(mask: Mask, q, k, v, causal, segment_ids, scale):
    """The exact variants' reference: plain softmax under the explicit [T, S] `mask.dense`."""
    check_inputs(q, k, v, segment_ids, causal)
    dense = mask.dense(q.shape[1], k.shape[1])
    return softmax_attention(q, k, v, mask=dense, segment_ids=segment_ids, scale=scale)
