"""Flash-style tiled softmax attention under any tile-level mask (the engine of `blockwise`).

Online softmax over key tiles with float32 running max and sum (Rabe & Staats 2021; Dao et al.
2022, FlashAttention). A `jax.custom_vjp` saves only the output and the per-row log-sum-exp, and
its backward recomputes tile scores, so memory is O(T) in the forward and the backward.

Which tiles run is a static *schedule* built from `Mask.tile_visible`: tiles that no query can
see are never computed, and tiles that every query sees fully skip the mask. Segment ids prune
further at run time: a tile whose query and key segment ranges do not overlap is skipped. In a
packed row a mask that is not shift invariant (a block pattern) runs the band of tiles its
`reach` allows and applies its predicate per element on positions within the document. With a
traced q_offset (decoding under jit) every tile is scheduled and the band is checked at run time.

The forward also returns the per-row log-sum-exp; its cotangent flows into the backward
(dS = P * (dP - delta + dlse)), so partial results can be merged differentiably.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_variants.common import Layout, check_positive, default_scale
from attention_variants.masks import Mask, _band


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
def make_schedule(
    mask: Mask, T: int, S: int, bq: int, bk: int, segmented: bool, q_offset: int | None = 0
) -> Schedule:
    """Builds the tile schedule of `mask` for lengths T, S, tile sizes bq, bk and the static
    q_offset (None: traced, so every tile is scheduled and pruned at run time)."""
    nq, nk = -(-T // bq), -(-S // bk)
    if q_offset is None:
        visible, full = np.ones((nq, nk), bool), np.zeros((nq, nk), bool)
        kv, count, n_full = _lists(visible, full)
        q, q_count, q_full = _lists(visible.T, full.T)
        return Schedule(kv, count, n_full, q, q_count, q_full)
    q_lo = q_offset + (np.arange(nq) * bq)[:, None]
    q_hi = q_offset + np.minimum(np.arange(nq)[:, None] * bq + bq, T) - 1
    k_lo = (np.arange(nk) * bk)[None, :]
    k_hi = np.minimum(k_lo + bk, S) - 1
    full = np.zeros((nq, nk), bool)
    if segmented and not mask.shift_invariant:  # the pattern is per document: band only
        visible = _band(q_lo, q_hi, k_lo, k_hi, mask.reach)
    else:
        visible = mask.tile_visible(q_lo, q_hi, k_lo, k_hi)
    visible = np.broadcast_to(visible, (nq, nk))
    if not segmented:  # segment ids can hide any pair, so then every tile is masked
        full = visible & mask.tile_full(q_lo, q_hi, k_lo, k_hi) & (k_hi - k_lo + 1 == bk)
    kv, count, n_full = _lists(visible, full)
    q, q_count, q_full = _lists(visible.T, full.T)
    return Schedule(kv, count, n_full, q, q_count, q_full)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call: the mask, lengths, tiles, head grouping, offset."""

    mask: Mask
    T: int
    S: int
    bq: int
    bk: int
    groups: int  # G = N // K query heads per key/value head
    segmented: bool
    q_offset: int | None  # None: traced
    absolute: bool  # positions are q_offset + i and j: computed per tile, not loaded

    @property
    def schedule(self) -> Schedule:
        return make_schedule(
            self.mask, self.T, self.S, self.bq, self.bk, self.segmented, self.q_offset
        )


# Inside the engine a query tile is [B, K, G*bq, H]: the G heads that share a key/value head
# are stacked along rows, so each tile product is one batched matmul with no repeated K/V.
# Coordinates arrive as tiles too: co = (q_pos, q_abs, doc_len | None, seg_q | None) of shape
# [nq, B|1, bq] and (k_pos, seg_k | None) of shape [nk, B|1, bk]; absolute positions at a
# static offset are computed per tile instead (cheaper for the many small tiles of a band).


def _tile_visible(st: _Static, qi, ki, co_q, co_k):
    """Boolean [B|1, 1, G*bq, bk] visibility of tile (qi, ki), evaluated from positions."""
    q_pos, _, doc_len, seg_q = co_q
    k_pos, seg_k = co_k
    k_index = ki * st.bk + jnp.arange(st.bk)
    if st.absolute:
        q_t = (st.q_offset + qi * st.bq + jnp.arange(st.bq))[None, :, None]  # [1, bq, 1]
        k_t = k_index[None, None, :]
    else:
        q_t, k_t = q_pos[qi][:, :, None], k_pos[ki][:, None, :]  # [B|1, bq, 1], [B|1, 1, bk]
    doc_t = None if doc_len is None else doc_len[qi][:, :, None]
    vis = st.mask.visible(q_t, k_t, doc_t) & (k_index < st.S)[None, None, :]  # [B|1, bq, bk]
    if st.segmented:
        vis = vis & (seg_q[qi][:, :, None] == seg_k[ki][:, None, :])
    vis = jnp.broadcast_to(vis[:, None], (vis.shape[0], st.groups, st.bq, st.bk))
    return vis.reshape(vis.shape[0], 1, st.groups * st.bq, st.bk)


def _matmul(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _masked_scores(st, masked, q_t, k_t, qi, ki, co_q, co_k):
    """Float32 scores [B, K, G*bq, bk] of a tile; hidden pairs are -inf."""
    s = _matmul("BKQH,BKSH->BKQS", q_t, k_t)
    if masked:
        s = jnp.where(_tile_visible(st, qi, ki, co_q, co_k), s, -jnp.inf)
    return s


def _pruned(st, body, co_q, co_k, qi, ki, carry):
    """Runs body(carry) unless the tile is empty at run time: its segment id ranges cannot
    meet, or (traced q_offset) it lies outside the mask's band of absolute positions."""
    checks = []
    if st.segmented:
        seg_q, seg_k = co_q[3][qi], co_k[1][ki]
        checks.append((seg_q.min(-1) <= seg_k.max(-1)) & (seg_k.min(-1) <= seg_q.max(-1)))
    if st.q_offset is None:
        q_abs = co_q[1][qi]
        k_lo, k_hi = ki * st.bk, jnp.minimum(ki * st.bk + st.bk, st.S) - 1
        checks.append(_band(q_abs.min(-1), q_abs.max(-1), k_lo, k_hi, st.mask.reach))
    if not checks:
        return body(carry)
    run = functools.reduce(lambda a, b: a & b, checks)
    return lax.cond(jnp.any(run), body, lambda c: c, carry)


def _two_loops(lo_full, hi, step, carry):
    """Visits positions [0, lo_full) without masks, then [lo_full, hi) with them."""
    carry = lax.fori_loop(0, lo_full, step(False), carry)
    return lax.fori_loop(lo_full, hi, step(True), carry)


def _forward(st: _Static, q, k, v, co_q, co_k):
    """q [nq, B, K, G*bq, H] (pre-scaled); k, v [nk, B, K, bk, H] -> out like q, lse.

    lse [nq, B, K, G*bq] is +inf on rows that see no key, so that exp(s - lse) = 0 there.
    """
    sched = st.schedule
    kv, count, n_full = (jnp.asarray(a) for a in (sched.kv, sched.count, sched.full))
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
                    s = _masked_scores(st, masked, q_t, k[ki], qi, ki, co_q, co_k)
                    m_new = jnp.maximum(m, s.max(-1))
                    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                    p = jnp.exp(s - m_safe[..., None])
                    alpha = jnp.exp(m - m_safe)[..., None]
                    return m_new, alpha * acc + _matmul(
                        "BKQS,BKSH->BKQH", p.astype(v.dtype), v1[ki]
                    )

                return _pruned(st, update, co_q, co_k, qi, ki, carry)

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


def _backward(st: _Static, res, cotangents, f32: bool = False):
    """Recomputes tile probabilities from lse; key tiles outside, their query tiles inside.

    dq is float32; dk, dv have k's and v's dtypes, or float32 with `f32` (partial sums that a
    caller adds up). `out` and `lse` may be those of a larger key set than k, v (a ring step):
    then dq, dk, dv are this key block's exact share of the full gradients."""
    q, k, v, co_q, co_k, out, lse = res
    d_out, d_lse = cotangents
    sched = st.schedule
    qs, q_count, q_full = (jnp.asarray(a) for a in (sched.q, sched.q_count, sched.q_full))
    # dS = P * (dP - delta + dlse): delta from the output, dlse from a used log-sum-exp.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [nq, B, K, Q]
    delta = delta - jnp.where(jnp.isfinite(lse), d_lse, 0.0)

    def one_key_tile(dq, args):
        ki, k_t, v_t = args

        def step(masked):
            def body(j, carry):
                qi = qs[ki, j]

                def update(carry):
                    dq, dk, dv = carry
                    q_t, do_t = q[qi], d_out[qi]
                    s = _masked_scores(st, masked, q_t, k_t, qi, ki, co_q, co_k)
                    p = jnp.exp(s - lse[qi][..., None])  # [B, K, G*bq, bk]
                    dv = dv + _matmul("BKQS,BKQH->BKSH", p.astype(v.dtype), do_t)
                    dp = _matmul("BKQH,BKSH->BKQS", do_t, v_t)
                    ds = (p * (dp - delta[qi][..., None])).astype(q.dtype)
                    dk = dk + _matmul("BKQS,BKQH->BKSH", ds, q_t)
                    return dq.at[qi].add(_matmul("BKQS,BKSH->BKQH", ds, k_t)), dk, dv

                return _pruned(st, update, co_q, co_k, qi, ki, carry)

            return body

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        dq, dk, dv = _two_loops(q_full[ki], q_count[ki], step, (dq, zeros, zeros))
        return dq, (dk, dv) if f32 else (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(one_key_tile, dq0, (jnp.arange(k.shape[0]), k, v))
    return dq, dk, dv


def _tiled_bwd(st, res, cotangents):
    dq, dk, dv = _backward(st, res, cotangents)
    return dq.astype(res[0].dtype), dk, dv, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(st, q, k, v, co_q, co_k):
    return _forward(st, q, k, v, co_q, co_k)


def _tiled_fwd(st, q, k, v, co_q, co_k):
    out, lse = _forward(st, q, k, v, co_q, co_k)
    return (out, lse), (q, k, v, co_q, co_k, out, lse)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def to_tiles(x, block: int, group: int):
    """[B, T, heads, H] -> tiles [n, B, K, group*block, H], T zero-padded to n * block.

    Rows of a tile are ordered (g, position): the `group` query heads sharing a K/V head.
    """
    B, T, heads, H = x.shape
    n = -(-T // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - T), (0, 0), (0, 0)))
    x = x.reshape(B, n, block, heads // group, group, H).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(n, B, heads // group, group * block, H)


def from_tiles(x, T: int, group: int):
    """The inverse of `to_tiles`: [n, B, K, group*block, H] -> [B, T, K*group, H]."""
    n, B, K, rows, H = x.shape
    x = x.reshape(n, B, K, group, rows // group, H).transpose(1, 0, 4, 2, 3, 5)
    return x.reshape(B, n * (rows // group), K * group, H)[:, :T]


def _coordinate_tiles(x, block: int):
    """[B|1, T] int -> [n, B|1, block], padded with the last value (None stays None)."""
    if x is None:
        return None
    n = -(-x.shape[1] // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - x.shape[1])), mode="edge")
    return x.reshape(x.shape[0], n, block).transpose(1, 0, 2)


def plan(T: int, N: int, S: int, K: int, mask: Mask, lay: Layout, block_sizes: BlockSizes):
    """The static description of a call of T queries (N heads) over S keys (K heads), and its
    coordinate tiles: (st, co_q, co_k) for `attend_tiles` / `attend_tiles_grads`."""
    bq, bk = min(block_sizes.block_q, T), min(block_sizes.block_k, S)
    absolute = lay.q_offset is not None and not lay.within_document
    st = _Static(mask, T, S, bq, bk, N // K, lay.segmented, lay.q_offset, absolute)
    co_q = tuple(_coordinate_tiles(x, bq) for x in (lay.q_pos, lay.q_abs, lay.doc_len, lay.q_seg))
    co_k = tuple(_coordinate_tiles(x, bk) for x in (lay.k_pos, lay.k_seg))
    return st, co_q, co_k


def scaled(q, scale):
    return (q.astype(jnp.float32) * default_scale(scale, q.shape[-1])).astype(q.dtype)


def tiled_attention(
    q,
    k,
    v,
    mask: Mask,
    lay: Layout,
    *,
    scale=None,
    block_sizes: BlockSizes = BlockSizes(),
    return_lse: bool = False,
):
    """Softmax attention of q [B,T,N,H] over k, v [B,S,K,H] under `mask`, tile by tile.

    `lay` places queries and keys (`common.layout`). Returns out [B, T, N, H] and, with
    `return_lse`, lse [B, T, N] float32 (-inf on rows that see no key).
    """
    st, co_q, co_k = plan(*q.shape[1:3], *k.shape[1:3], mask, lay, block_sizes)
    T, G = st.T, st.groups
    tiles = to_tiles(scaled(q, scale), st.bq, G), to_tiles(k, st.bk, 1), to_tiles(v, st.bk, 1)
    out, lse = _tiled(st, *tiles, co_q, co_k)
    out = from_tiles(out, T, G)
    if not return_lse:
        return out
    lse = from_tiles(lse[..., None], T, G)[..., 0]
    return out, jnp.where(jnp.isinf(lse), -jnp.inf, lse)


# The engine on tiles, for callers that keep their operands tiled across calls (`ring.py`):
# q tiles pre-scaled, lse +inf on rows that see no key, gradients float32 (of the scaled q).
attend_tiles = _forward
attend_tiles_grads = functools.partial(_backward, f32=True)
