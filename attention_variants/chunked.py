"""Chunked causal linear attention: the engine shared by `linear` and `performer`.

Kernelised attention (Katharopoulos et al. 2020, "Transformers are RNNs") replaces exp(q.k) by
a feature product phi(q).phi(k), so that

    out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s)

is computed from running sums of phi(k_s) v_s^T instead of a [T, S] score matrix. The causal
form runs chunk by chunk (the chunkwise-parallel form, e.g. Hua et al. 2022 "Transformer Quality
in Linear Time"): quadratic inside a chunk of C positions, plus a float32 state [B, K, F, H+1]
carried between chunks by `lax.scan` on CPU. On accelerators the chunks run at once instead
(`_in_parallel`, in groups of chunks that fit a working set): each chunk's own state, a prefix
over the chunks (`lax.associative_scan`), then every chunk's output from the state before it.
A column of ones appended to V makes the last state column the normaliser sum_s phi(k_s).
Time is O(T (C F + F H)) per head. The CPU's forward holds one chunk's [C, C] scores at a
time: memory O(T) for inputs and outputs plus O(C^2 + F H). Its backward is the scan's own
autodiff, which keeps every chunk's incoming state and scores for the reverse pass: O(T/C F H +
T C) per head, still linear in T (about the size of q, k and v themselves at C = F = H = 64),
not O(C^2 + F H).

Features arrive computed: qf [B, T, N, F], kf [B, S, K, F] (non-negative, float32). Performer's
exponential features also pass `log_scale` m [B, S, K]: the true key feature is kf * exp(m).
The engine then keeps a running max M_t of m over the keys a query sees and weighs key s by
exp(m_s - M_t) <= 1 (the online-softmax trick): M_t is the same for every key of query t, so it
cancels in the ratio, depends on no future key (causality stays exact), and nothing overflows.

Packed sequences arrive as run ids (`common.layout`: each document one contiguous run): within a
chunk pairs are masked by segment equality, and the carried state serves only queries of the
segment it was built from (it restarts at each segment start). Query heads are grouped per K/V head
(G = N // K), so K/V are never repeated.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants.common import check_positive

EPS = 1e-20  # guards normalisers: rows whose features all underflow give 0, not 0/0
NEG = -1e30  # "minus infinity" for running maxima; finite, so no inf - inf = NaN


@dataclasses.dataclass(frozen=True)
class Chunking:
    """Chunk length C: performance only, results change only by float rounding.

    64 was the fastest of 16..256 for `linear` and `performer` on a 2-core AVX-512 CPU
    (B=1, N=8, H=64, T=1K..16K). A length shorter than a chunk runs as one chunk.
    """

    chunk: int = 64

    def __post_init__(self):
        check_positive(chunk=self.chunk)


class State(NamedTuple):
    """The running sums after some keys: what the causal form carries between chunks, and a
    decoding cache (`decoding.py`)."""

    kv: jax.Array  # [B, K, F, H+1] float32: sum_s w_s phi(k_s) [v_s, 1]^T
    log_scale: jax.Array | None  # [B, K] running max M of the keys' log scales, or None


@jax.custom_jvp
def ratio(acc):
    """acc [..., H+1] -> acc[..., :H] / acc[..., H], the normaliser guarded by EPS.

    Its derivative is written as (d num - out d den) / den, never num / den**2, which would
    overflow for small normalisers.
    """
    return acc[..., :-1] / jnp.maximum(acc[..., -1:], EPS)


@ratio.defjvp
def _ratio_jvp(primals, tangents):
    (acc,), (d_acc,) = primals, tangents
    den = jnp.maximum(acc[..., -1:], EPS)
    out = acc[..., :-1] / den
    return out, (d_acc[..., :-1] - out * jnp.where(acc[..., -1:] > EPS, d_acc[..., -1:], 0)) / den


def with_ones(v):
    """v [..., H] -> float32 [..., H+1] with a column of ones (its products give normalisers)."""
    v = v.astype(jnp.float32)
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)


def _group(qf, K: int):
    B, T, N, F = qf.shape
    return qf.reshape(B, T, K, N // K, F)  # [B, T, K, G, F]


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, preferred_element_type=jnp.float32)


def _chunks(x, C: int, fill=0.0):
    """[B, T, ...] -> [B, n, C, ...], T padded with `fill` (None: x's last row) to n * C."""
    B, T = x.shape[:2]
    n = -(-T // C)
    pad = [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, mode="edge") if fill is None else jnp.pad(x, pad, constant_values=fill)
    return x.reshape(B, n, C, *x.shape[2:])


def _chunk_step(strict: bool, G: int, m_given: bool, seg_given: bool):
    """A chunk's two halves: output(state, chunk) -> its sums (acc, Mt), from the keys before
    it (the state) and its own; update(state, chunk) -> the state after it.

    Chunk: q [B, K, Q, F] (Q = G*C rows ordered (g, c)), k [B, K, C, F], v [B, K, C, H+1],
    m [B, K, C], seg [B, C]. State: S [B, K, F, H+1]; M [B, K], the running max of m it is
    relative to; prev [B], the segment it belongs to.
    """

    def output(carry, chunk):
        S, M, prev = carry
        q, k, v, m, seg = chunk
        C = k.shape[2]
        pos = jnp.arange(C)
        vis = pos[:, None] > pos[None, :] if strict else pos[:, None] >= pos[None, :]
        vis = jnp.tile(vis, (G, 1))[None, None]  # [1, 1, Q, C]: row sees column
        if seg_given:
            seg_q = jnp.tile(seg, (1, G))  # [B, Q]
            vis = vis & (seg_q[:, :, None] == seg[:, None, :])[:, None]
            cont = (seg_q == prev[:, None])[:, None]  # [B, 1, Q]: continues the state's segment
        scores = _einsum("BKQF,BKDF->BKQD", q, k)
        read = _einsum("BKQF,BKFH->BKQH", q, S)  # the earlier chunks' keys
        if m_given:  # weigh key s by exp(m_s - M_t), M_t the max over what query t sees
            M_q = M[..., None] if not seg_given else jnp.where(cont, M[..., None], NEG)
            Mt = jnp.maximum(jnp.where(vis, m[:, :, None], NEG).max(-1), M_q)  # [B, K, Q]
            scores = scores * jnp.exp(jnp.where(vis, m[:, :, None] - Mt[..., None], NEG))
            r = jnp.exp(M_q - Mt)  # (a query that sees nothing has M_t = M_q = NEG: r = 1)
            read = read * (jnp.where(cont, r, 0.0) if seg_given else r)[..., None]
        else:
            scores, Mt = jnp.where(vis, scores, 0.0), None
            if seg_given:
                read = jnp.where(cont[..., None], read, 0.0)
        return _einsum("BKQD,BKDH->BKQH", scores, v) + read, Mt

    def update(carry, chunk):
        # The state after the chunk holds the keys of the chunk's last segment only.
        S, M, prev = carry
        _, k, v, m, seg = chunk
        if seg_given:
            last = seg[:, -1]
            keep = (seg == last[:, None])[:, None]  # [B, 1, C]
            go_on = prev == last  # [B]: else that segment starts here, from an empty state
            S = jnp.where(go_on[:, None, None, None], S, 0.0)
            M = jnp.where(go_on[:, None], M, NEG) if m_given else None
            prev = last
        if m_given:
            m_keep = jnp.where(keep, m, NEG) if seg_given else m
            M_new = jnp.maximum(M, m_keep.max(-1))  # [B, K]
            k = k * jnp.exp(m_keep - M_new[..., None])[..., None]
            S, M = S * jnp.exp(M - M_new)[..., None, None], M_new
        elif seg_given:
            k = jnp.where(keep[..., None], k, 0.0)
        return S + _einsum("BKDF,BKDH->BKFH", k, v), M, prev

    return output, update


def _then(a, b):
    """The state after the keys of `a` then those of `b` (states stacked on a leading axis, as
    `lax.associative_scan` combines them): b's reset flag drops a. Associative."""
    (S1, M1, r1), (S2, M2, r2) = a, b
    cut = r2[..., None, None, None]
    if M1 is None:
        return jnp.where(cut, S2, S1 + S2), None, r1 | r2
    M = jnp.maximum(M1, M2)  # both weights <= 1, so neither branch overflows (or its gradient)
    S = S1 * jnp.exp(M1 - M)[..., None, None] + S2 * jnp.exp(M2 - M)[..., None, None]
    return jnp.where(cut, S2, S), jnp.where(r2[..., None], M2, M), r1 | r2


def _in_parallel(output, update, carry, xs):
    """`lax.scan` of (update, output) over the chunks without its sequential dependency, for
    accelerators: each chunk's own sums from an empty state (all chunks at once), a prefix
    over them (`lax.associative_scan`; a chunk whose last segment starts in it resets what came
    before), then every chunk's output from the state before it (all at once). Holds every
    chunk's state and scores at once, O(T/C F H + T C G) per key/value head (the scan's
    backward keeps as much; its forward one chunk's)."""
    S0, M0, prev0 = carry
    seg = xs[4]
    n = xs[1].shape[0]
    last = jnp.broadcast_to(prev0, (n, *prev0.shape)) if seg is None else seg[:, :, -1]
    prev = jnp.concatenate([prev0[None], last[:-1]])  # [n, B]: the segment each chunk follows
    empty = (jnp.zeros_like(S0), None if M0 is None else jnp.full_like(M0, NEG))
    own_S, own_M, _ = jax.vmap(lambda chunk, p: update((*empty, p), chunk))(xs, last)
    first = (S0[None], None if M0 is None else M0[None], jnp.zeros((1, *prev0.shape), bool))
    own = (own_S, own_M, last != prev)
    S, M, _ = lax.associative_scan(_then, jax.tree.map(lambda a, b: jnp.concatenate([a, b]),
                                                       first, own))  # fmt: skip
    before = (S[:-1], None if M is None else M[:-1], prev)
    acc, Mt = jax.vmap(output)(before, xs)
    return (S[-1], None if M is None else M[-1], last[-1]), (acc, Mt)


WORKING_SET = 1 << 28  # bytes of chunk scores and states the accelerators' form holds at once


def _in_groups(output, update, carry, xs):
    """`_in_parallel` over groups of chunks that fit WORKING_SET, one group after another (a
    scan carrying the state between groups; one group when all fit). The chunks are padded to
    whole groups with empty ones (no keys: the state passes through)."""
    q, k, v, m, seg = xs
    n, B, K, Q, F = q.shape
    C, H1 = k.shape[3], v.shape[-1]
    group = max(1, WORKING_SET // (4 * B * K * (Q * C + Q * H1 + F * H1)))
    if group >= n:
        return _in_parallel(output, update, carry, xs)
    pad = -n % group

    def fill(x, **how):  # pad the chunk axis
        return None if x is None else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), **how)

    padded = (fill(q), fill(k), fill(v), fill(m, constant_values=NEG), fill(seg, mode="edge"))
    grouped = jax.tree.map(lambda x: x.reshape(-1, group, *x.shape[1:]), padded)
    carry, ys = lax.scan(lambda c, x: _in_parallel(output, update, c, x), carry, grouped)
    return carry, jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:])[:n], ys)


def causal_sums(
    qf, kf, v1, *, log_scale=None, segment_ids=None, chunk: int, strict=False, state=None
):
    """Chunked causal sums: acc_t = sum_{s<=t} w_ts qf_t.kf_s v1_s, per query head.

    qf [B, T, N, F]; kf [B, T, K, F]; v1 [B, T, K, H+1] float32. Key s counts for query t iff
    s <= t (s < t when `strict`) and, with segment_ids, both lie in the same segment.
    `state` (a `State`, no segment_ids): the sums of keys before these, e.g. a decoding cache.
    Returns acc [B, T, N, H+1]; with log_scale, M [B, T, N] (w_ts = exp(m_s - M_t)), else
    None; and the `State` after the last key.
    """
    B, T, N, F = qf.shape
    K = kf.shape[2]
    G, C = N // K, min(chunk, T)
    # Chunk-major, head-major; the G query heads of a K/V head are stacked as rows (g, c).
    q = _chunks(_group(qf, K), C).transpose(1, 0, 3, 4, 2, 5)  # [n, B, K, G, C, F]
    n = q.shape[0]
    q = q.reshape(n, B, K, G * C, F)
    k = _chunks(kf, C).transpose(1, 0, 3, 2, 4)  # [n, B, K, C, F]
    v = _chunks(v1, C).transpose(1, 0, 3, 2, 4)  # [n, B, K, C, H+1]
    m = None if log_scale is None else _chunks(log_scale, C, NEG).transpose(1, 0, 3, 2)
    seg = None if segment_ids is None else _chunks(segment_ids, C, fill=None).transpose(1, 0, 2)
    if state is None:
        state = init_state(B, K, F, v1.shape[-1] - 1, stabilised=m is not None)
    prev0 = jnp.zeros((B,), jnp.int32) if seg is None else seg[0, :, 0]
    output, update = _chunk_step(strict, G, m is not None, seg is not None)
    carry, xs = (*state, prev0), (q, k, v, m, seg)
    if jax.default_backend() == "cpu":  # one chunk after another: the fastest here
        step = lambda carry, chunk: (update(carry, chunk), output(carry, chunk))  # noqa: E731
        (S, M, _), (acc, Mt) = lax.scan(step, carry, xs)
    else:
        (S, M, _), (acc, Mt) = _in_groups(output, update, carry, xs)
    Mt = None if Mt is None else _unchunk(Mt[..., None], G, T)[..., 0]
    return _unchunk(acc, G, T), Mt, State(S, M)


def _unchunk(y, G: int, T: int):
    """[n, B, K, G*C, X] -> [B, T, N, X]."""
    n, B, K, Q, X = y.shape
    y = y.reshape(n, B, K, G, Q // G, X).transpose(1, 0, 4, 2, 3, 5)
    return y.reshape(B, n * (Q // G), K * G, X)[:, :T]


def global_sums(qf, kf, v1, *, log_scale=None):
    """Non-causal sums over every key: acc [B, T, N, H+1]."""
    B, T, N, _ = qf.shape
    K = kf.shape[2]
    if log_scale is not None:
        kf = kf * jnp.exp(log_scale - jnp.max(log_scale, axis=1, keepdims=True))[..., None]
    S = _einsum("BSKF,BSKH->BKFH", kf, v1)
    return _einsum("BTKGF,BKFH->BTKGH", _group(qf, K), S).reshape(B, T, N, -1)


def _segment_sums(qf, kf, v1, *, log_scale, segment_ids, chunk):
    """Non-causal within packed segments: keys s <= t (forward) plus s > t (a reversed pass)."""
    flip = lambda x: None if x is None else jnp.flip(x, axis=1)  # noqa: E731
    kw = dict(segment_ids=segment_ids, chunk=chunk)
    acc, M, _ = causal_sums(qf, kf, v1, log_scale=log_scale, **kw)
    kw["segment_ids"] = flip(segment_ids)
    reversed_qkv = map(flip, (qf, kf, v1))
    acc_b, M_b, _ = causal_sums(*reversed_qkv, log_scale=flip(log_scale), strict=True, **kw)
    acc_b, M_b = flip(acc_b), flip(M_b)
    if M is None:
        return acc + acc_b
    M_all = jnp.maximum(M, M_b)
    return acc * jnp.exp(M - M_all)[..., None] + acc_b * jnp.exp(M_b - M_all)[..., None]


def linear_attention(qf, kf, v, *, causal, segment_ids=None, log_scale=None, chunk: int):
    """Kernelised attention from features: qf [B,T,N,F], kf [B,S,K,F], v [B,S,K,H].

    Returns float32 [B, T, N, H]. `log_scale` [B, S, K] (optional) multiplies key features by
    exp(log_scale), applied stably (see the module docstring).
    """
    v1 = with_ones(v)
    if log_scale is not None:
        log_scale = lax.stop_gradient(log_scale.astype(jnp.float32))
    kw = dict(log_scale=log_scale)
    if causal:
        acc, _, _ = causal_sums(qf, kf, v1, segment_ids=segment_ids, chunk=chunk, **kw)
    elif segment_ids is not None:
        acc = _segment_sums(qf, kf, v1, segment_ids=segment_ids, chunk=chunk, **kw)
    else:
        acc = global_sums(qf, kf, v1, **kw)
    return ratio(acc)


def visible_mask(T: int, S: int, *, causal: bool, segment_ids=None):
    """Boolean [B|1, T, S]: which keys each query sums over (references and tests only)."""
    vis = jnp.ones((1, T, S), bool)
    if causal:
        vis = vis & jnp.tril(vis)
    if segment_ids is not None:
        vis = vis & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return vis


def linear_attention_reference(qf, kf, v, *, causal, segment_ids=None, log_scale=None):
    """The same sums written out over an explicit [T, S] mask (float32, for the tests).

    out_t = sum_{s visible} w_ts qf_t.kf_s v_s / sum_{s visible} w_ts qf_t.kf_s with
    w_ts = exp(m_s - max_{s' visible to t} m_s'), or 1 without log_scale.
    """
    B, T, N, _ = qf.shape
    S, K, H = v.shape[1:]
    vis = visible_mask(T, S, causal=causal, segment_ids=segment_ids)[:, None, None]
    scores = _einsum("BTKGF,BSKF->BKGTS", _group(qf, K), kf)  # [B, K, G, T, S]
    if log_scale is not None:
        m = lax.stop_gradient(log_scale.astype(jnp.float32)).transpose(0, 2, 1)  # [B, K, S]
        m = jnp.where(vis, m[:, :, None, None, :], -jnp.inf)
        scores = scores * jnp.exp(m - jnp.max(m, axis=-1, keepdims=True))
    scores = jnp.where(vis, scores, 0.0)
    acc = _einsum("BKGTS,BSKH->BTKGH", scores, with_ones(v))
    return ratio(acc).reshape(B, T, N, H)


def init_state(batch: int, kv_heads: int, features: int, head_dim: int, stabilised=False):
    """An empty decoding state (`stabilised`: with the running max that log_scale needs)."""
    kv = jnp.zeros((batch, kv_heads, features, head_dim + 1), jnp.float32)
    return State(kv, jnp.full((batch, kv_heads), NEG, jnp.float32) if stabilised else None)


def chunked_flops(B, T, S, N, H, *, causal=True, features: int, chunk: int, **_) -> float:
    """Matmul FLOPs of the algorithm above, K = N heads, F features, C = min(chunk, T).

    Causal: per query head 2 T C F (chunk scores) + 2 T C (H+1) (their product with [V, 1])
    + 2 T F (H+1) (state readout), and 2 S F (H+1) per head for state updates.
    Non-causal: the state (2 S F (H+1)) and its readout (2 T F (H+1)) only (with segment_ids,
    which this count does not see, the causal work twice: a forward and a reversed pass).
    """
    F, H1 = features, H + 1
    flops = 2.0 * S * F * H1 + 2.0 * T * F * H1
    if causal:
        flops += 2.0 * T * min(chunk, T) * (F + H1)
    return B * N * flops
