"""Flash-style tiled softmax attention under any tile-level mask (the engine of `blockwise`).

Online softmax over key tiles with float32 running max and sum (Rabe & Staats 2021; Dao et al.
2022, FlashAttention). A `jax.custom_vjp` saves only the output and the per-row log-sum-exp, and
its backward recomputes tile scores, so memory is O(T) in the forward and the backward.

Which tiles run is a static *schedule* built from `Mask.tile_visible`: tiles that no query can
see are never computed, and tiles that every query sees fully skip the mask. Segment ids prune
further at run time: a tile whose query and key segment ranges do not overlap is skipped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_variants.common import check_inputs, check_positive, default_scale
from attention_variants.masks import Mask


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: performance only, they change results only by float rounding.

    Defaults tuned on a 2-core AVX-512 CPU (see docs/benchmarks.md); a length shorter than a
    tile runs as one tile.
    """

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_k=self.block_k)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Static tile schedule: for query tile i, the key tiles kv[i, :count[i]] it visits.

    Within each row the first `full[i]` entries are tiles seen entirely (no mask needed).
    The transposed lists (q, q_count, q_full) drive the backward pass over key tiles.
    """

    kv: np.ndarray
    count: np.ndarray
    full: np.ndarray
    q: np.ndarray
    q_count: np.ndarray
    q_full: np.ndarray

    @property
    def tiles(self) -> int:
        return int(self.count.sum())


def _lists(visible: np.ndarray, full: np.ndarray):
    """Per row: indices of visible columns, full ones first, padded; counts of each kind."""
    rows, cols = visible.shape
    order = np.argsort(~full * 2 + ~visible, axis=1, kind="stable")  # full, partial, hidden
    count = visible.sum(1).astype(np.int32)
    n_full = full.sum(1).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    return order[:, :width].astype(np.int32), count, n_full


@functools.lru_cache(maxsize=256)
def make_schedule(mask: Mask, T: int, S: int, bq: int, bk: int, segmented: bool) -> Schedule:
    """Builds the tile schedule of `mask` for lengths T, S and tile sizes bq, bk."""
    nq, nk = -(-T // bq), -(-S // bk)
    q_lo = (np.arange(nq) * bq)[:, None]
    q_hi = np.minimum(q_lo + bq, T) - 1
    k_lo = (np.arange(nk) * bk)[None, :]
    k_hi = np.minimum(k_lo + bk, S) - 1
    visible = np.broadcast_to(mask.tile_visible(q_lo, q_hi, k_lo, k_hi), (nq, nk))
    full = np.zeros((nq, nk), bool)
    if not segmented:  # segment ids can hide any pair, so then every tile is masked
        full = visible & mask.tile_full(q_lo, q_hi, k_lo, k_hi) & (k_hi - k_lo + 1 == bk)
    kv, count, n_full = _lists(visible, full)
    q, q_count, q_full = _lists(visible.T, full.T)
    return Schedule(kv, count, n_full, q, q_count, q_full)


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask
    scale: float
    T: int
    S: int
    bq: int
    bk: int
    segmented: bool

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.mask, self.T, self.S, self.bq, self.bk, self.segmented)


def _tile_visible(st: _Static, qi, ki, seg_q, seg_k):
    """Boolean [B|1, 1, 1, bq, bk] visibility of tile (qi, ki), evaluated from positions."""
    q_pos = qi * st.bq + jnp.arange(st.bq)[:, None]
    k_pos = ki * st.bk + jnp.arange(st.bk)[None, :]
    vis = st.mask.visible(q_pos, k_pos) & (k_pos < st.S)
    vis = vis[None]
    if st.segmented:
        vis = vis & (seg_q[qi][:, :, None] == seg_k[ki][:, None, :])
    return vis[:, None, None]


def _scores(st: _Static, q_t, k_t):
    """q_t [B, K, G, bq, H], k_t [B, K, bk, H] -> float32 scores [B, K, G, bq, bk]."""
    B, K, G, bq, H = q_t.shape
    s = jnp.einsum(
        "BKQH,BKSH->BKQS", q_t.reshape(B, K, G * bq, H), k_t, preferred_element_type=jnp.float32
    )
    return s.reshape(B, K, G, bq, -1) * st.scale


def _segments_overlap(seg_range_q, seg_range_k, qi, ki):
    (q_min, q_max), (k_min, k_max) = seg_range_q, seg_range_k
    return jnp.any((q_min[qi] <= k_max[ki]) & (k_min[ki] <= q_max[qi]))


def _pruned(st, body, seg_ranges, qi, ki, carry):
    """Runs body unless segment ids prove the tile empty."""
    if not st.segmented:
        return body(carry)
    overlap = _segments_overlap(*seg_ranges, qi, ki)
    return lax.cond(overlap, body, lambda c: c, carry)


def _seg_ranges(seg_q, seg_k):
    return (seg_q.min(-1), seg_q.max(-1)), (seg_k.min(-1), seg_k.max(-1))


def _forward(st: _Static, q, k, v, seg_q, seg_k):
    """q [nq, B, K, G, bq, H]; k, v [nk, B, K, bk, H] -> out like q, lse [nq, B, K, G, bq]."""
    sched = st.schedule
    kv, count, n_full = (jnp.asarray(a) for a in (sched.kv, sched.count, sched.full))
    seg_ranges = _seg_ranges(seg_q, seg_k) if st.segmented else None
    _, B, K, G, bq, H = q.shape

    def one_query_tile(args):
        qi, q_t = args

        def step(masked):
            def body(j, carry):
                ki = kv[qi, j]

                def update(carry):
                    m, l, acc = carry
                    s = _scores(st, q_t, k[ki])
                    if masked:
                        s = jnp.where(_tile_visible(st, qi, ki, seg_q, seg_k), s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(-1))
                    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                    p = jnp.exp(s - m_safe[..., None])
                    alpha = jnp.exp(m - m_safe)
                    pv = jnp.einsum(
                        "BKQS,BKSH->BKQH",
                        p.reshape(B, K, G * bq, -1).astype(v.dtype),
                        v[ki],
                        preferred_element_type=jnp.float32,
                    ).reshape(B, K, G, bq, H)
                    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

                return _pruned(st, update, seg_ranges, qi, ki, carry)

            return body

        init = (
            jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, H), jnp.float32),
        )
        carry = lax.fori_loop(0, n_full[qi], step(False), init)
        m, l, acc = lax.fori_loop(n_full[qi], count[qi], step(True), carry)
        empty = l == 0.0
        out = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return out.astype(q.dtype), lse

    return lax.map(one_query_tile, (jnp.arange(q.shape[0]), q))


def _backward(st: _Static, res, d_out):
    """Recomputes tile probabilities from lse; loops key tiles outside, query tiles inside."""
    q, k, v, seg_q, seg_k, out, lse = res
    sched = st.schedule
    qs, q_count, q_full = (jnp.asarray(a) for a in (sched.q, sched.q_count, sched.q_full))
    seg_ranges = _seg_ranges(seg_q, seg_k) if st.segmented else None
    nq, B, K, G, bq, H = q.shape
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [nq,B,K,G,bq]

    def one_key_tile(dq, args):
        ki, k_t, v_t = args

        def step(masked):
            def body(j, carry):
                qi = qs[ki, j]

                def update(carry):
                    dq, dk, dv = carry
                    q_t, do_t = q[qi], d_out[qi]
                    s = _scores(st, q_t, k_t)
                    if masked:
                        s = jnp.where(_tile_visible(st, qi, ki, seg_q, seg_k), s, -jnp.inf)
                    p = jnp.exp(s - lse[qi][..., None])  # [B, K, G, bq, bk]
                    do_m = do_t.reshape(B, K, G * bq, H)
                    p_m = p.reshape(B, K, G * bq, -1)
                    dv = dv + jnp.einsum(
                        "BKQS,BKQH->BKSH",
                        p_m.astype(v.dtype),
                        do_m,
                        preferred_element_type=jnp.float32,
                    )
                    dp = jnp.einsum(
                        "BKQH,BKSH->BKQS", do_m, v_t, preferred_element_type=jnp.float32
                    ).reshape(p.shape)
                    ds = (p * (dp - delta[qi][..., None]) * st.scale).reshape(p_m.shape)
                    ds = ds.astype(q.dtype)
                    dq_t = jnp.einsum(
                        "BKQS,BKSH->BKQH", ds, k_t, preferred_element_type=jnp.float32
                    ).reshape(B, K, G, bq, H)
                    dk = dk + jnp.einsum(
                        "BKQS,BKQH->BKSH",
                        ds,
                        q_t.reshape(B, K, G * bq, H),
                        preferred_element_type=jnp.float32,
                    )
                    return dq.at[qi].add(dq_t), dk, dv

                return _pruned(st, update, seg_ranges, qi, ki, carry)

            return body

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        carry = lax.fori_loop(0, q_full[ki], step(False), (dq, zeros, zeros))
        dq, dk, dv = lax.fori_loop(q_full[ki], q_count[ki], step(True), carry)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(one_key_tile, dq0, (jnp.arange(k.shape[0]), k, v))
    return dq.astype(q.dtype), dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(st, q, k, v, seg_q, seg_k):
    return _forward(st, q, k, v, seg_q, seg_k)[0]


def _tiled_fwd(st, q, k, v, seg_q, seg_k):
    out, lse = _forward(st, q, k, v, seg_q, seg_k)
    return out, (q, k, v, seg_q, seg_k, out, lse)


_tiled.defvjp(_tiled_fwd, _backward)


def _to_tiles(x, block: int, group: int | None):
    """[B, T, heads, H] -> tiles [n, B, K, (G,) block, H], T zero-padded up to n * block."""
    B, T, heads, H = x.shape
    n = -(-T // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - T), (0, 0), (0, 0)))
    if group is None:  # keys and values: [n, B, K, bk, H]
        return x.reshape(B, n, block, heads, H).transpose(1, 0, 3, 2, 4)
    x = x.reshape(B, n, block, heads // group, group, H)
    return x.transpose(1, 0, 3, 4, 2, 5)  # [n, B, K, G, bq, H]


def _seg_tiles(segment_ids, block: int):
    B, T = segment_ids.shape
    n = -(-T // block)
    seg = jnp.pad(segment_ids, ((0, 0), (0, n * block - T)), constant_values=-1)
    return seg.reshape(B, n, block).transpose(1, 0, 2)  # [n, B, block]


def tiled_attention(
    q, k, v, mask: Mask, *, segment_ids=None, scale=None, block_sizes: BlockSizes = BlockSizes()
):
    """Softmax attention of q [B,T,N,H] over k, v [B,S,K,H] under `mask`, tile by tile."""
    check_inputs(q, k, v, segment_ids)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    bq, bk = min(block_sizes.block_q, T), min(block_sizes.block_k, S)
    st = _Static(mask, default_scale(scale, H), T, S, bq, bk, segment_ids is not None)
    seg_q = seg_k = None
    if segment_ids is not None:
        seg_q, seg_k = _seg_tiles(segment_ids, bq), _seg_tiles(segment_ids, bk)
    out = _tiled(
        st, _to_tiles(q, bq, N // K), _to_tiles(k, bk, None), _to_tiles(v, bk, None), seg_q, seg_k
    )
    nq = out.shape[0]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, N, H)  # [B, Tp, K*G, H]
    return out[:, :T]
