"""Linear attention with decay and the delta rule: a matrix state, computed chunk by chunk.

The family (`families.RecurrentState`: RetNet, GLA, Mamba-2, DeltaNet, Gated DeltaNet) shares
one recurrence, per batch row and head, with row vectors q_t, k_t [F], v_t [H] and a float32
state S [F, H]:

    S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t                            (decay only)
    S_t = exp(a_t) (S_{t-1} - beta_t k_t^T k_t S_{t-1}) + beta_t k_t^T v_t   (delta rule)
    o_t = q_t S_t

with log decays a_t <= 0 per head (a scalar, [B, T, N]) or per key feature ([B, T, N, F]),
and write strengths beta_t in [0, 1] (delta rule, scalar decays only). `recurrence` below runs
it token by token: the reference. `chunked` computes the same thing chunk by chunk (Yang et
al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training"; the delta
rule after Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"). Within a chunk of C tokens, with b_t = a_1 + ... + a_t (log decay since the
chunk's start, so b_t - b_s <= 0 for s <= t and every exponent below is <= 0: nothing
overflows) and S_0 the state before the chunk:

    o_t = (q_t * exp(b_t)) S_0 + sum_{s<=t} (q_t * exp(b_t - b_s)) . k_s  u_s
    S_C = exp(b_C) * S_0 + sum_s (k_s * exp(b_C - b_s))^T u_s

with u_s = v_s without the delta rule. With it, u_s = beta_s (v_s - exp(a_s) k_s S_{s-1}) is
the value the write really adds; unrolling S_{s-1} gives the triangular system
(I + A) U = diag(beta) V - diag(beta) (K * exp(b)) S_0 with A_ts = beta_t exp(b_t - b_s) k_t.k_s
for s < t (the WY/UT form): U = U~ - W S_0, both solved for every chunk at once. Everything but
the state's pass from chunk to chunk (a `lax.scan` over T / C chunks of F x H updates) runs for
all chunks in parallel (on CPU for groups of `CPU_GROUP` chunks in turn, which keeps a group's
products in cache). Memory O(T (C + F H / C)) per head: the chunks' [C, C] products and
each chunk's incoming state (the backward keeps them).

Packed rows (run ids, `common.layout`) restart the state at each document start: pairs of
different documents are masked, a token reads S_0 only if its document continues the one the
state holds, and the state after a chunk keeps the keys of its last document only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

from attention_variants.chunked import _chunks as _row_chunks
from attention_variants.chunked import _einsum


def _chunks(x, C: int, fill=0.0):
    """[B, T, N, ...] -> [B, N, n, C, ...], T padded with `fill` (None: the last row) to n C."""
    x = _row_chunks(x, C, fill)  # [B, n, C, ...]
    return jnp.moveaxis(x, 3, 1) if x.ndim > 3 else x  # ids [B, T] stay [B, n, C]


def _unchunk(y, T: int):
    """[B, N, n, C, H] -> [B, T, N, H]."""
    B, N, n, C, H = y.shape
    return jnp.moveaxis(y, 1, 3).reshape(B, n * C, N, H)[:, :T]


def init_state(batch: int, heads: int, features: int, head_dim: int):
    """An empty state [B, N, F, H] float32 (a decoding cache)."""
    return jnp.zeros((batch, heads, features, head_dim), jnp.float32)


# Chunks per group on CPU: the groups run one after another, so the chunks' products of one
# group stay in cache. All chunks at once, time grew as T^1.10-1.15 from 4K to 32K; groups of 4
# (2 and 8 within 5%) made retnet 1.6x and gated_deltanet 1.3-1.7x faster at 32K, T^1.0.
CPU_GROUP = 4


def chunked(q, k, v, *, log_decay=None, beta=None, delta=False, segment_ids=None, chunk=64,
            state=None, group=None):  # fmt: skip
    """The recurrence chunk by chunk: q, k [B, T, N, F], v [B, T, N, H] (one state per head);
    log_decay [B, T, N] or [B, T, N, F] (None: no decay); beta [B, T, N] (None: 1; used with
    `delta`); segment_ids [B, T] run ids; `state` [B, N, F, H], the state before the first
    token (None: empty). `group`: chunks computed together (None: all on accelerators,
    CPU_GROUP on CPU; results change only by rounding). Returns (out [B, T, N, H] float32,
    the state after the last token)."""
    B, T, N, F = q.shape
    C = min(chunk, T)
    n = -(-T // C)
    if group is None:
        group = CPU_GROUP if jax.default_backend() == "cpu" else n
    g = min(group, n)
    length = -(-n // g) * g * C  # whole groups of whole chunks; padding changes nothing
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    a = jnp.zeros((B, T, N, 1), jnp.float32) if log_decay is None else f32(log_decay)
    a = a[..., None] if a.ndim == 3 else a  # [B, T, N, D]: D = 1 (per head) or F
    inputs = [q, k, v, a]
    if delta:
        inputs.append((jnp.ones((B, T, N), jnp.float32) if beta is None else beta)[..., None])

    def pad(x, fill=0.0):  # [B, T, ...] -> [B, length, ...], `fill` (None: the last row)
        widths = [(0, 0), (0, length - T)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, **({"mode": "edge"} if fill is None else {}))

    # [m, B, N, g, C, .]: m groups of g chunks; padding: a = 0 (no decay), k = beta = 0 (no write)
    grouped = [_groups(_chunks(f32(pad(x)), C), g) for x in inputs]
    seg = None
    if segment_ids is not None:
        seg = _chunks(pad(segment_ids, None), C, fill=None)  # [B, n', C]
        before = jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)  # the state's doc
        seg = tuple(x.reshape(B, -1, g, *x.shape[2:]).swapaxes(0, 1) for x in (seg, before))
    S0 = init_state(B, N, F, v.shape[-1]) if state is None else f32(state)
    step = functools.partial(_group_step, delta=delta)
    final, out = lax.scan(step, S0, (*grouped[:4], grouped[4] if delta else None, seg))
    out = jnp.moveaxis(out, 0, 2)  # [B, N, m, g, C, H]
    return _unchunk(out.reshape(B, N, -1, *out.shape[-2:]), T), final


def _groups(x, g: int):
    """[B, N, n, C, .] -> [n / g, B, N, g, C, .]."""
    B, N, n = x.shape[:3]
    return jnp.moveaxis(x.reshape(B, N, n // g, g, *x.shape[3:]), 2, 0)


def _group_step(S0, xs, *, delta: bool):
    """One group of chunks (module docstring): every chunk's products at once, then the state's
    pass through the group's chunks. q, k [B, N, n, C, F], v [B, N, n, C, H], a [.., C, D],
    beta [.., C, 1] or None; seg: (ids [B, n, C], the document of the state before each chunk
    [B, n]) or None. Returns (the state after the group, out [B, N, n, C, H])."""
    q, k, v, a, beta, seg = xs
    C, H = q.shape[3], v.shape[-1]
    b = jnp.cumsum(a, axis=3)  # log decay since the chunk's start, <= 0
    pos = jnp.arange(C)
    causal = pos[:, None] >= pos[None, :]  # [C, C]: t sees s
    if seg is None:
        same, cont, keep = causal, True, True
    else:
        seg, before = seg
        same = causal & (seg[..., :, None] == seg[..., None, :])[:, None]  # [B, 1, n, C, C]
        cont = (seg == before[..., None])[:, None, ..., None]  # [B, 1, n, C, 1]: reads S_0
        keep = (seg == seg[..., -1:])[:, None, ..., None]  # [B, 1, n, C, 1]: stays in S_C
    decay = jnp.exp(jnp.where(same[..., None], b[..., :, None, :] - b[..., None, :, :], -jnp.inf))
    if a.shape[-1] == 1:  # [.., C, C, 1]: t's weight of s, per head
        scores = _einsum("BNcTF,BNcSF->BNcTS", q, k) * decay[..., 0]
    else:  # per key feature
        scores = _einsum("BNcTF,BNcSF,BNcTSF->BNcTS", q, k, decay)
    read = jnp.exp(b) * cont  # [B, N, n, C, D]: weight of S_0 for token t
    q_read = q * read
    k_write = k * jnp.exp(b[..., -1:, :] - b) * keep  # [B, N, n, C, F]
    carry = jnp.exp(b[..., -1, :]) * (cont[..., -1, :] if seg is not None else 1.0)
    if delta:
        gram = _einsum("BNcTF,BNcSF->BNcTS", k, k) * decay[..., 0]
        gram = jnp.where(pos[:, None] > pos[None, :], gram, 0.0)  # s < t only
        system = jnp.eye(C) + beta * gram  # unit lower triangular
        rhs = beta * jnp.concatenate([v, k * read], axis=-1)
        solved = solve_triangular(system, rhs, lower=True, unit_diagonal=True)
        values, w = solved[..., :H], solved[..., H:]  # u = values - w S_0
    else:
        values, w = v, None

    def step(S, chunk):  # S [B, N, F, H]: the state before the chunk
        values, w, k_write, carry = chunk
        u = values if w is None else values - _einsum("BNCF,BNFH->BNCH", w, S)
        after = carry[..., None] * S + _einsum("BNCF,BNCH->BNFH", k_write, u)
        return after, S

    per_chunk = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)  # noqa: E731
    final, before = lax.scan(step, S0, tuple(map(per_chunk, (values, w, k_write, carry))))
    before = jnp.moveaxis(before, 0, 2)  # [B, N, n, F, H]
    u = values if w is None else values - _einsum("BNcCF,BNcFH->BNcCH", w, before)
    out = _einsum("BNcTF,BNcFH->BNcTH", q_read, before) + _einsum("BNcTS,BNcSH->BNcTH", scores, u)
    return final, out


def recurrence(q, k, v, *, log_decay=None, beta=None, delta=False, segment_ids=None,
               state=None):  # fmt: skip
    """The same recurrence token by token, as the papers write it (float32; the reference).

    At a document start the state restarts from zero. Returns (out [B, T, N, H], final state).
    """
    B, T, N, F = q.shape
    H = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    a = jnp.zeros((B, T, N), jnp.float32) if log_decay is None else f32(log_decay)
    a = a[..., None] if a.ndim == 3 else a  # [B, T, N, 1 | F]
    beta = jnp.ones((B, T, N), jnp.float32) if beta is None else f32(beta)
    starts = (
        jnp.zeros((B, T), bool)
        if segment_ids is None
        else jnp.concatenate(
            [jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
    )

    def step(S, token):  # S [B, N, F, H]
        q_t, k_t, v_t, a_t, beta_t, start = token
        S = jnp.where(start[:, None, None, None], 0.0, S)
        decayed = jnp.exp(a_t)[..., None] * S  # diag(exp(a_t)) S
        if delta:  # exp(a) (S - beta k^T k S) + beta k^T v
            recalled = _einsum("BNF,BNFH->BNH", k_t, decayed)
            S = decayed + beta_t[..., None, None] * _einsum("BNF,BNH->BNFH", k_t, v_t - recalled)
        else:
            S = decayed + _einsum("BNF,BNH->BNFH", k_t, v_t)
        return S, _einsum("BNF,BNFH->BNH", q_t, S)

    S0 = init_state(B, N, F, H) if state is None else f32(state)
    tokens = tuple(jnp.moveaxis(x, 1, 0) for x in (f32(q), f32(k), f32(v), a, beta, starts))
    final, out = lax.scan(step, S0, tokens)
    return jnp.moveaxis(out, 0, 1), final


def chunked_flops(B, T, N, F, H, *, chunk: int, delta: bool) -> float:
    """Matmul FLOPs of `chunked`, C = min(chunk, T), per head: the chunks' scores 2 T C F and
    their product with the values 2 T C H, the state's readout 2 T F H and update 2 T F H;
    with the delta rule also the keys' Gram matrix 2 T C F, the triangular solve T C (H + F)
    and the correction W S_0, 2 T F H."""
    C = min(chunk, T)
    flops = 2.0 * T * C * (F + H) + 4.0 * T * F * H
    if delta:
        flops += 2.0 * T * C * F + T * C * (H + F) + 2.0 * T * F * H
    return B * N * flops
