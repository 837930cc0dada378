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
    """Everything static about one call: the mask, lengths, tiles and head grouping."""

    mask: Mask
    T: int
    S: int
    bq: int
    bk: int
    groups: int  # G = N // K query heads per key/value head
    segmented: bool

    @property
    def schedule(self) -> Schedule:
        return make_schedule(self.mask, self.T, self.S, self.bq, self.bk, self.segmented)


# Inside the engine a query tile is [B, K, G*bq, H]: the G heads that share a key/value head
# are stacked along rows, so each tile product is one batched matmul with no repeated K/V.


def _tile_visible(st: _Static, qi, ki, seg_q, seg_k):
    """Boolean [B|1, 1, G*bq, bk] visibility of tile (qi, ki), evaluated from positions."""
    q_pos = qi * st.bq + jnp.arange(st.bq)[:, None]
    k_pos = ki * st.bk + jnp.arange(st.bk)[None, :]
    vis = (st.mask.visible(q_pos, k_pos) & (k_pos < st.S))[None]  # [1, bq, bk]
    if st.segmented:
        vis = vis & (seg_q[qi][:, :, None] == seg_k[ki][:, None, :])  # [B, bq, bk]
    vis = jnp.broadcast_to(vis[:, None], (vis.shape[0], st.groups, st.bq, st.bk))
    return vis.reshape(vis.shape[0], 1, st.groups * st.bq, st.bk)


def _matmul(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _masked_scores(st, masked, q_t, k_t, qi, ki, seg_q, seg_k):
    """Float32 scores [B, K, G*bq, bk] of a tile; hidden pairs are -inf."""
    s = _matmul("BKQH,BKSH->BKQS", q_t, k_t)
    if masked:
        s = jnp.where(_tile_visible(st, qi, ki, seg_q, seg_k), s, -jnp.inf)
    return s


def _pruned(st, body, seg_ranges, qi, ki, carry):
    """Runs body(carry) unless the segment id ranges of the two tiles cannot meet."""
    if not st.segmented:
        return body(carry)
    (q_min, q_max), (k_min, k_max) = seg_ranges
    overlap = jnp.any((q_min[qi] <= k_max[ki]) & (k_min[ki] <= q_max[qi]))
    return lax.cond(overlap, body, lambda c: c, carry)


def _seg_ranges(seg_q, seg_k):
    return (seg_q.min(-1), seg_q.max(-1)), (seg_k.min(-1), seg_k.max(-1))


def _two_loops(lo_full, hi, step, carry):
    """Visits positions [0, lo_full) without masks, then [lo_full, hi) with them."""
    carry = lax.fori_loop(0, lo_full, step(False), carry)
    return lax.fori_loop(lo_full, hi, step(True), carry)


def _forward(st: _Static, q, k, v, seg_q, seg_k):
    """q [nq, B, K, G*bq, H] (pre-scaled); k, v [nk, B, K, bk, H] -> out like q, lse."""
    sched = st.schedule
    kv, count, n_full = (jnp.asarray(a) for a in (sched.kv, sched.count, sched.full))
    seg_ranges = _seg_ranges(seg_q, seg_k) if st.segmented else None
    # A column of ones after V makes the PV matmul also return the softmax row sums.
    ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
    v1 = jnp.concatenate([v, ones], axis=-1)  # [nk, B, K, bk, H + 1]
    rows = q.shape[1:-1]  # [B, K, G*bq]

    def one_query_tile(args):
        qi, q_t = args

        def step(masked):
            def body(j, carry):
                ki = kv[qi, j]

                def update(carry):
                    m, acc = carry  # running max [B,K,Q]; [B,K,Q,H+1] = (sum p v, sum p)
                    s = _masked_scores(st, masked, q_t, k[ki], qi, ki, seg_q, seg_k)
                    m_new = jnp.maximum(m, s.max(-1))
                    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                    p = jnp.exp(s - m_safe[..., None])
                    alpha = jnp.exp(m - m_safe)[..., None]
                    return m_new, alpha * acc + _matmul(
                        "BKQS,BKSH->BKQH", p.astype(v.dtype), v1[ki]
                    )

                return _pruned(st, update, seg_ranges, qi, ki, carry)

            return body

        init = (
            jnp.full(rows, -jnp.inf, jnp.float32),
            jnp.zeros((*rows, v1.shape[-1]), jnp.float32),
        )
        m, acc = _two_loops(n_full[qi], count[qi], step, init)
        l = acc[..., -1]
        empty = l == 0.0  # rows that see no key: output zeros, and lse = +inf gives p = 0
        l = jnp.where(empty, 1.0, l)
        lse = jnp.where(empty, jnp.inf, m + jnp.log(l))
        return (acc[..., :-1] / l[..., None]).astype(q.dtype), lse

    return lax.map(one_query_tile, (jnp.arange(q.shape[0]), q))


def _backward(st: _Static, res, d_out):
    """Recomputes tile probabilities from lse; key tiles outside, their query tiles inside."""
    q, k, v, seg_q, seg_k, out, lse = res
    sched = st.schedule
    qs, q_count, q_full = (jnp.asarray(a) for a in (sched.q, sched.q_count, sched.q_full))
    seg_ranges = _seg_ranges(seg_q, seg_k) if st.segmented else None
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [nq, B, K, Q]

    def one_key_tile(dq, args):
        ki, k_t, v_t = args

        def step(masked):
            def body(j, carry):
                qi = qs[ki, j]

                def update(carry):
                    dq, dk, dv = carry
                    q_t, do_t = q[qi], d_out[qi]
                    s = _masked_scores(st, masked, q_t, k_t, qi, ki, seg_q, seg_k)
                    p = jnp.exp(s - lse[qi][..., None])  # [B, K, G*bq, bk]
                    dv = dv + _matmul("BKQS,BKQH->BKSH", p.astype(v.dtype), do_t)
                    dp = _matmul("BKQH,BKSH->BKQS", do_t, v_t)
                    ds = (p * (dp - delta[qi][..., None])).astype(q.dtype)
                    dk = dk + _matmul("BKQS,BKQH->BKSH", ds, q_t)
                    return dq.at[qi].add(_matmul("BKQS,BKSH->BKQH", ds, k_t)), dk, dv

                return _pruned(st, update, seg_ranges, qi, ki, carry)

            return body

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        dq, dk, dv = _two_loops(q_full[ki], q_count[ki], step, (dq, zeros, zeros))
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


def _tiles(x, block: int, group: int):
    """[B, T, heads, H] -> tiles [n, B, K, group*block, H], T zero-padded to n * block.

    Rows of a tile are ordered (g, position): the `group` query heads sharing a K/V head.
    """
    B, T, heads, H = x.shape
    n = -(-T // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - T), (0, 0), (0, 0)))
    x = x.reshape(B, n, block, heads // group, group, H).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(n, B, heads // group, group * block, H)


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
    G = N // K
    bq, bk = min(block_sizes.block_q, T), min(block_sizes.block_k, S)
    st = _Static(mask, T, S, bq, bk, G, segment_ids is not None)
    seg_q = seg_k = None
    if segment_ids is not None:
        seg_q, seg_k = _seg_tiles(segment_ids, bq), _seg_tiles(segment_ids, bk)
    q_scaled = (q.astype(jnp.float32) * default_scale(scale, H)).astype(q.dtype)
    out = _tiled(st, _tiles(q_scaled, bq, G), _tiles(k, bk, 1), _tiles(v, bk, 1), seg_q, seg_k)
    nq = out.shape[0]
    out = out.reshape(nq, B, K, G, bq, H).transpose(1, 0, 4, 2, 3, 5)  # [B, nq, bq, K, G, H]
    return out.reshape(B, nq * bq, N, H)[:, :T]
