"""Content-selected key blocks: each query attends to the blocks its own content picks.

MoBA (Lu et al. 2025, "Mixture of Block Attention"): the keys of a document are split into
blocks of `block` positions; a query's gate for each block wholly before its own is
g = q . mean(K_block) (unscaled, float32); it attends causally to its own block and to the
`top_k - 1` highest-gated earlier blocks (all of them when there are fewer). The selection has
no gradient; the attention over the selected keys has.

NSA (Yuan et al. 2025, "Native Sparse Attention") is the same engine with another ranking and
two more branches (`Selection.scoring="compressed"`, `branched_attention`): blocks rank by the
probabilities of a compressed branch (attention over the whole blocks' mean keys and values,
`compressed_attention`), summed over each key/value head's query heads; the document's first
blocks and the local ones are always picked; a sliding window on the tiled engine is the third
branch, and per-token gates weigh the three.

The engine (`selected_attention`) never scores a key it will not use. Per row of the batch:
1. the blocks: a block id per key position (blocks restart at every document), each block's
   start and length, and its mean key (`blocks`, `block_means`: O(S) memory);
2. per chunk of `chunk` queries, the gates against the window of blocks that chunk's queries
   can pick (their documents' blocks before theirs: at most ceil(S / block) + chunk of them),
   and `lax.top_k` of them (`selections`);
3. the own block, causal, on the tiled engine (`tiled.py`, a fixed block-diagonal mask);
4. the picked (query, head, block) pairs, sorted by block and key/value head and cut into
   tiles of `tile` pairs that share one key block (`tiles_of`): each tile is one [tile, H] x
   [H, block] product. A group of pairs leaves at most one partial tile, and at most
   ceil(S / block) blocks per key/value head are picked, so the tiles are a static number:
   pairs / tile + K * ceil(S / block). A `jax.custom_vjp` recomputes a tile's scores in the
   backward and adds dK, dV into their block;
5. the two parts merge by their log-sum-exps.
Work is O(T * top_k * block * H) per head plus the gates' O(T * S / block * H); memory
O(T * top_k * H). NSA's compressed branch adds O(T * S / block * H) (its scores are computed
again for the ranking, without gradient) and its window O(T * window * H).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants.common import Layout, run_ids, run_starts, softmax_or_zeros
from attention_variants.masks import Fixed, Mask, Window, check_int
from attention_variants.tiled import block_sizes, tiled_attention

SCORINGS = ("gate", "compressed")


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a block-selection variant declares: blocks of `block` key positions within each
    document and `top_k` blocks per query counting its own, among them always the document's
    first `initial` blocks and the `local` blocks that end with its own (MoBA: 0 and 1).

    scoring: how the other blocks rank. "gate" (MoBA): q . mean(K_block), unscaled, per query
      head. "compressed" (NSA): the probability the compressed branch gives the block (softmax
      of scale * q . mean(K_block) over the document's blocks that end at or before the query),
      summed over the query heads of each key/value head, so a group picks together.
    window: NSA's third branch (required with "compressed", else 0): the output is then
      g_cmp * compressed + g_slc * selected + g_win * (a causal window of `window` keys), the
      gates per token and head in [0, 1] (`branch_gates` [B, T, N, 3]; None: 1/2 each).
    """

    block: int
    top_k: int
    initial: int = 0
    local: int = 1
    scoring: str = "gate"
    window: int = 0

    def __post_init__(self):
        check_int("block", self.block)
        check_int("top_k", self.top_k)
        check_int("initial", self.initial, 0)
        check_int("local", self.local)
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got scoring={self.scoring!r}")
        if self.branches:
            check_int("window", self.window)
        elif self.window != 0:
            raise ValueError(f"window (NSA's branch) needs scoring='compressed', got "
                             f"window={self.window!r} with scoring={self.scoring!r}")  # fmt: skip
        if self.initial + self.local > self.top_k:
            raise ValueError(
                f"top_k must be at least initial + local = {self.initial + self.local} (the "
                f"blocks always selected), got top_k={self.top_k}"
            )

    @property
    def branches(self) -> bool:
        """Whether the output is NSA's gated sum of the compressed, selected and window
        branches (else the selected blocks' attention alone)."""
        return self.scoring == "compressed"


class Blocks(NamedTuple):
    """The key blocks of one row: per key position its block id and its document's first
    block id [S]; per block id its start position and length [S] (start S, length 0 past the
    last block). Blocks are numbered along the row, so a document's blocks are consecutive."""

    index: jax.Array
    first: jax.Array
    start: jax.Array
    length: jax.Array


def blocks(run: jax.Array | None, S: int, block: int) -> Blocks:
    """The blocks of a row of S keys whose documents are the runs of `run` [S] (None: one)."""
    position = jnp.arange(S, dtype=jnp.int32)
    local = position if run is None else position - run_starts(run[None])[0]
    opens = local % block == 0
    index = jnp.cumsum(opens, dtype=jnp.int32) - 1
    start = jnp.nonzero(opens, size=S, fill_value=S)[0].astype(jnp.int32)
    length = jnp.diff(start, append=S)
    return Blocks(index, index - local // block, start, length)


def uniform_blocks(S: int, block: int) -> Blocks:
    """The blocks of an unpacked row: block g holds positions [g * block, (g + 1) * block)."""
    index = jnp.arange(S, dtype=jnp.int32) // block
    start = jnp.arange(S, dtype=jnp.int32) * block
    length = jnp.clip(S - start, 0, block)
    return Blocks(index, jnp.zeros_like(index), jnp.minimum(start, S), length)


def block_means(k, bl: Blocks):
    """Mean key of each block [S, K, H] float32 (rows past the last block: 0); k [S, K, H]."""
    sums = jax.ops.segment_sum(k.astype(jnp.float32), bl.index, num_segments=k.shape[0])
    return sums / jnp.maximum(bl.length, 1)[:, None, None]


class _Static(NamedTuple):
    sel: Selection
    chunk: int  # queries per step of the gating
    groups: int  # query heads per key/value head
    tile: int  # (query, block) pairs per tile of the attention over selected blocks
    tiles: int  # tiles per row (a static bound)
    scale: float  # the scores' (for the "compressed" scoring)


def _candidates(own0, rows: int, S: int, Q: int, block: int):
    """The window [w0, w0 + span) of block rows that a chunk of Q queries, the first in block
    `own0`, can reach: every block of their documents up to theirs (at most ceil(S / block)
    before the first query's, and one more per query)."""
    span = min(rows, -(-S // block) + Q)
    return jnp.clip(own0 - (span - Q), 0, rows - span), span


def compressed_scores(q, q_pos, means, ids, bl: Blocks, groups: int, block: int, scale: float):
    """NSA's compressed branch's scores [Q, N, span]: scale * q . mean(K_block) for the blocks
    `ids` [span] (mean keys `means` [span, K, H] float32), -inf unless the block is whole
    (`block` keys) and of the query's document, and ends at or before the query (q_pos [Q])."""
    heads = jnp.arange(q.shape[1]) // groups
    s = jnp.einsum("QNH,SNH->QNS", q.astype(jnp.float32), means[:, heads]) * scale
    whole = (bl.length[ids] == block)[None] & (ids[None] >= bl.first[q_pos][:, None])
    done = whole & (bl.start[ids][None] + block - 1 <= q_pos[:, None])
    return jnp.where(done[:, None], s, -jnp.inf)


def _select(st: _Static, q, q_pos, bl: Blocks, means):
    """The earlier blocks each query of a chunk picks: [Q, N, top_k - 1] block ids (-1: none).
    q [Q, N, H], q_pos [Q]; means [M, K, H] float32, one row per block."""
    sel, (Q, N, _) = st.sel, q.shape
    own, first = bl.index[q_pos], bl.first[q_pos]
    w0, span = _candidates(own[0], means.shape[0], bl.index.shape[0], Q, sel.block)
    window = lax.dynamic_slice_in_dim(means, w0, span)  # [span, K, H]: the chunk's candidates
    ids = w0 + jnp.arange(span)
    if sel.scoring == "gate":
        heads = jnp.arange(N) // st.groups
        gate = jnp.einsum("QNH,SNH->QNS", q.astype(jnp.float32), window[:, heads])
    else:  # the compressed branch's probabilities, summed over each key/value head's group
        s = compressed_scores(q, q_pos, window, ids, bl, st.groups, sel.block, st.scale)
        p = softmax_or_zeros(s)
        gate = jnp.repeat(p.reshape(Q, -1, st.groups, span).sum(2), st.groups, axis=1)
    earlier = (ids[None] >= first[:, None]) & (ids[None] < own[:, None])  # [Q, span]
    forced = (ids[None] < first[:, None] + sel.initial) | (ids[None] > own[:, None] - sel.local)
    gate = jnp.where(forced[:, None], jnp.inf, gate)
    gate = jnp.where(earlier[:, None], gate, -jnp.inf)
    top, at = lax.top_k(gate, min(sel.top_k - 1, span))
    chosen = jnp.where(top > -jnp.inf, w0 + at, -1)
    return jnp.pad(chosen, ((0, 0), (0, 0), (0, sel.top_k - 1 - chosen.shape[-1])),
                   constant_values=-1)  # fmt: skip


def chunked_queries(fn, chunk: int, q, q_pos):
    """fn(q [chunk, ...], q_pos [chunk]) over a row's queries q [T, ...], `chunk` at a time
    (padded queries repeat the last position), its outputs cut back to [T, ...]."""
    T, pad = q.shape[0], -q.shape[0] % chunk
    q = jnp.pad(q, ((0, pad),) + ((0, 0),) * (q.ndim - 1))
    q_pos = jnp.pad(q_pos, (0, pad), mode="edge")
    out = lax.map(lambda xs: fn(*xs), (q.reshape(-1, chunk, *q.shape[1:]),
                                       q_pos.reshape(-1, chunk)))  # fmt: skip
    return out.reshape(-1, *out.shape[2:])[:T]


def compressed_attention(q, q_pos, key_means, value_means, bl: Blocks, *, block: int,
                         groups: int, scale: float, chunk: int):  # fmt: skip
    """NSA's compressed branch on one row: each query q [T, N, H] at q_pos [T] attends to the
    mean keys and values [M, K, H] (float32, one row per block) of its document's whole blocks
    that end at or before it -> [T, N, H] float32 (0 before the first block ends). `chunk`
    queries at a time, each chunk recomputed in the backward: memory O(chunk * M)."""
    heads = jnp.arange(q.shape[1]) // groups

    @jax.checkpoint
    def part(qc, pc):
        w0, span = _candidates(bl.index[pc[0]], key_means.shape[0], bl.index.shape[0],
                               qc.shape[0], block)  # fmt: skip
        km, vm = (lax.dynamic_slice_in_dim(x, w0, span) for x in (key_means, value_means))
        s = compressed_scores(qc, pc, km, w0 + jnp.arange(span), bl, groups, block, scale)
        return jnp.einsum("QNS,SNH->QNH", softmax_or_zeros(s), vm[:, heads])

    return chunked_queries(part, min(chunk, q.shape[0]), q, q_pos)


def selections(st: _Static, q, q_pos, bl: Blocks, means):
    """[T, N, top_k - 1] picked blocks of one row, `chunk` queries at a time."""
    return chunked_queries(lambda qc, pc: _select(st, qc, pc, bl, means), st.chunk, q, q_pos)


class Tiles(NamedTuple):
    """The (query, head, block) pairs of one row in tiles of pairs sharing a key block and a
    key/value head, [tiles, tile] each (padding pairs: `valid` False)."""

    pair: jax.Array  # index into the flat [T * N * (top_k - 1)] pairs
    query: jax.Array
    head: jax.Array
    valid: jax.Array
    block: jax.Array  # [tiles]
    kv_head: jax.Array  # [tiles]


def tiles_of(st: _Static, picked, K: int, M: int) -> Tiles:
    """Groups the picked pairs [T, N, top_k - 1] by (block, key/value head), each group cut
    into tiles of `tile` pairs: pairs / tile tiles, plus at most one partial tile per group."""
    T, N, picks = picked.shape
    flat = picked.reshape(-1)
    kv = ((jnp.arange(N) // st.groups)[None, :, None] + jnp.zeros_like(picked)).reshape(-1)
    groups = M * K
    key = jnp.where(flat >= 0, flat * K + kv, groups)  # unpicked slots sort last
    order = jnp.argsort(key, stable=True)
    count = jax.ops.segment_sum(jnp.ones_like(key), key, num_segments=groups + 1)[:groups]
    offset = jnp.cumsum(count) - count
    per_group = -(-count // st.tile)
    ends = jnp.cumsum(per_group)
    i = jnp.arange(st.tiles)
    group = jnp.minimum(jnp.searchsorted(ends, i, side="right"), groups - 1)
    lo = offset[group] + (i - (ends[group] - per_group[group])) * st.tile
    at = lo[:, None] + jnp.arange(st.tile)
    valid = (at < (offset + count)[group][:, None]) & (i < ends[-1])[:, None]
    pair = order[jnp.clip(at, 0, flat.shape[0] - 1)]
    return Tiles(pair, pair // (N * picks), (pair // picks) % N, valid, group // K, group % K)


def _tile_scores(st: _Static, q_s, k, tl: Tiles, bl: Blocks, i):
    """Scores [tile, block] of tile i (masked past the block's end and on padding pairs), its
    queries [tile, H] and the block's start."""
    b = st.sel.block
    start = bl.start[tl.block[i]]
    qt = q_s[tl.query[i], tl.head[i]]
    kb = lax.dynamic_slice(k, (tl.kv_head[i], start, 0), (1, b, k.shape[-1]))[0]
    s = jnp.einsum("QH,bH->Qb", qt, kb, preferred_element_type=jnp.float32)
    sees = (jnp.arange(b) < bl.length[tl.block[i]])[None] & tl.valid[i][:, None]
    return jnp.where(sees, s, -jnp.inf), qt, kb, start


def _pairs_forward(st: _Static, q_s, k, v, tl: Tiles, bl: Blocks):
    """Attention of each picked pair over its block: o [P, H] float32, lse [P] (-inf: unpicked).
    q_s [T, N, H] pre-scaled; k, v [K, S + block, H] (padded by a block)."""

    def tile(i):
        s, _, _, start = _tile_scores(st, q_s, k, tl, bl, i)
        vb = lax.dynamic_slice(v, (tl.kv_head[i], start, 0), (1, st.sel.block, v.shape[-1]))[0]
        m = s.max(-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        total = p.sum(-1)
        o = jnp.einsum("Qb,bH->QH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        lse = jnp.where(total > 0, m[:, 0] + jnp.log(total), -jnp.inf)
        return o / jnp.maximum(total, 1e-30)[:, None], lse

    o, lse = lax.map(tile, jnp.arange(st.tiles))
    P = q_s.shape[0] * q_s.shape[1] * (st.sel.top_k - 1)
    at = jnp.where(tl.valid, tl.pair, P).reshape(-1)  # padding pairs land past the end
    o = jnp.zeros((P, q_s.shape[-1]), jnp.float32).at[at].set(o.reshape(-1, o.shape[-1]),
                                                               mode="drop")  # fmt: skip
    return o, jnp.full((P,), -jnp.inf).at[at].set(lse.reshape(-1), mode="drop")


def _pairs_backward(st: _Static, q_s, k, v, tl: Tiles, bl: Blocks, o, lse, d_o, d_lse):
    """dq_s [T, N, H], dk, dv [K, S + block, H] (float32) of the pairs' o and lse."""
    delta = jnp.sum(d_o * o, -1) - jnp.where(jnp.isfinite(lse), d_lse, 0.0)  # [P]
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # unpicked: p = 0
    b = st.sel.block

    def tile(carry, i):
        dq, dk, dv = carry
        s, qt, kb, start = _tile_scores(st, q_s, k, tl, bl, i)
        vb = lax.dynamic_slice(v, (tl.kv_head[i], start, 0), (1, b, v.shape[-1]))[0]
        pair = tl.pair[i]
        p = jnp.exp(s - lse[pair][:, None])  # [tile, b]
        do = d_o[pair]
        dp = jnp.einsum("QH,bH->Qb", do, vb, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[pair][:, None])
        dq = dq.at[tl.query[i], tl.head[i]].add(jnp.einsum("Qb,bH->QH", ds, kb))
        at = (tl.kv_head[i], start, 0)
        grow = lambda x, y: lax.dynamic_update_slice(  # noqa: E731
            x, lax.dynamic_slice(x, at, (1, b, x.shape[-1])) + y[None], at
        )
        dk = grow(dk, jnp.einsum("Qb,QH->bH", ds, qt.astype(jnp.float32)))
        dv = grow(dv, jnp.einsum("Qb,QH->bH", p, do))
        return (dq, dk, dv), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (dq, dk, dv), _ = lax.scan(tile, (zeros(q_s), zeros(k), zeros(v)), jnp.arange(st.tiles))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pairs(st, q_s, k, v, tl, bl):
    return jax.vmap(functools.partial(_pairs_forward, st))(q_s, k, v, tl, bl)


def _pairs_fwd(st, q_s, k, v, tl, bl):
    o, lse = _pairs(st, q_s, k, v, tl, bl)
    return (o, lse), (q_s, k, v, tl, bl, o, lse)


def _pairs_bwd(st, res, cotangents):
    q_s, k, v, tl, bl, o, lse = res
    grads = jax.vmap(functools.partial(_pairs_backward, st))(q_s, k, v, tl, bl, o, lse,
                                                               *cotangents)  # fmt: skip
    return (*(g.astype(x.dtype) for g, x in zip(grads, (q_s, k, v), strict=True)), None, None)


_pairs.defvjp(_pairs_fwd, _pairs_bwd)


def own_block_mask(block: int) -> Mask:
    """A query's own block up to itself (blocks within the document): `Fixed` without
    summaries, and-ed with the window it implies so packed rows keep a band of tiles."""
    return Fixed(block, 0) & Window(block - 1, 0)


TILE = 128  # (query, block) pairs per tile


def tile_count(T: int, N: int, K: int, S: int, block: int, top_k: int, tile: int = TILE,
               blocks: int | None = None) -> int:  # fmt: skip
    """Tiles of picked pairs per row (a static bound): T N (top_k - 1) pairs in tiles, plus one
    partial tile per picked (block, key/value head); `blocks`: rows of the block table."""
    pairs = T * N * (top_k - 1)
    blocks = -(-S // block) if blocks is None else min(blocks, -(-S // block))
    return -(-pairs // tile) + min(pairs, K * blocks)


def selected_attention(q, k, v, sel: Selection, *, lay: Layout, bl: Blocks, means=None,
                       scale: float, chunk: int, tile: int = TILE):  # fmt: skip
    """q [B, T, N, H] over k, v [B, S, K, H] placed by `lay` (`common.layout`, positions
    within documents), with the keys' blocks `bl` (each field [B, S]) -> out [B, T, N, H].
    `means` [B, M, K, H]: the blocks' mean keys (default: from k). The own block runs on the
    tiled engine; the picked earlier blocks in tiles of `tile` (query, block) pairs; the two
    merge by their log-sum-exps. The selection carries no gradient."""
    (B, T, N, H), (S, K) = q.shape, k.shape[1:3]
    if means is None:
        means = jax.vmap(block_means)(k, bl)
    means = lax.stop_gradient(means)
    own_mask = own_block_mask(sel.block)
    own, own_lse = tiled_attention(q, k, v, own_mask, lay, scale=scale, return_lse=True,
                                   block_sizes=block_sizes(own_mask, lay.segmented))  # fmt: skip
    if sel.top_k == 1:
        return own
    M = means.shape[1]
    tiles = tile_count(T, N, K, S, sel.block, sel.top_k, tile, blocks=M)
    st = _Static(sel, min(chunk, T), N // K, tile, tiles, scale)
    q_pos = jnp.broadcast_to(lay.q_abs, (B, T))
    picked = jax.vmap(functools.partial(selections, st))(q, q_pos, bl, means)
    plan = jax.vmap(lambda p: tiles_of(st, lax.stop_gradient(p), K, M))(picked)
    padded = lambda x: jnp.pad(x, ((0, 0), (0, sel.block), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    q_s = (q.astype(jnp.float32) * scale).astype(q.dtype)
    o, lse = _pairs(st, q_s, padded(k), padded(v), plan, bl)
    o = o.reshape(B, T, N, sel.top_k - 1, H)
    lse = lse.reshape(B, T, N, sel.top_k - 1)
    every = jnp.concatenate([own_lse[..., None], lse], -1)
    total = jax.nn.logsumexp(every, axis=-1, keepdims=True)
    weight = jnp.exp(every - total)  # [B, T, N, top_k]
    picked_out = jnp.einsum("BTNk,BTNkH->BTNH", weight[..., 1:], o)
    return (weight[..., 0, None] * own.astype(jnp.float32) + picked_out).astype(q.dtype)


def branched_attention(q, k, v, sel: Selection, *, lay: Layout, bl: Blocks, scale: float,
                       chunk: int, branch_gates=None, means=None, value_means=None):  # fmt: skip
    """`selected_attention`, and for NSA (`sel.branches`) its gated sum with the compressed
    branch (`compressed_attention`) and a causal window of `sel.window` keys (the tiled
    engine): out [B, T, N, H]. `branch_gates` [B, T, N, 3] (cmp, slc, win; None: 1/2 each);
    `means`, `value_means` [B, M, K, H]: the blocks' mean keys and values (default: from k, v)."""
    if means is None:
        means = jax.vmap(block_means)(k, bl)
    selected = selected_attention(q, k, v, sel, lay=lay, bl=bl, means=means, scale=scale,
                                  chunk=chunk)  # fmt: skip
    if not sel.branches:
        return selected
    if value_means is None:
        value_means = jax.vmap(block_means)(v, bl)
    (B, T, N, _), K = q.shape, k.shape[2]
    q_pos = jnp.broadcast_to(lay.q_abs, (B, T))
    compressed = jax.vmap(functools.partial(
        compressed_attention, block=sel.block, groups=N // K, scale=scale, chunk=chunk,
    ))(q, q_pos, means, value_means, bl)  # fmt: skip
    band = Window(sel.window - 1, 0)
    window = tiled_attention(q, k, v, band, lay, scale=scale,
                             block_sizes=block_sizes(band, lay.segmented))  # fmt: skip
    return gated_sum(branch_gates, compressed, selected, window)


def gated_sum(branch_gates, compressed, selected, window):
    """NSA's output: sum over the branches of gate * branch (gates [B, T, N, 3]; None: 1/2)."""
    parts = jnp.stack([x.astype(jnp.float32) for x in (compressed, selected, window)], -1)
    if branch_gates is None:
        return (0.5 * parts.sum(-1)).astype(selected.dtype)
    g = branch_gates.astype(jnp.float32)[..., None, :]
    return jnp.sum(g * parts, -1).astype(selected.dtype)


def step_attention(q, k, v, sums, position, sel: Selection, *, scale: float, value_sums=None,
                   branch_gates=None):  # fmt: skip
    """One decoding step: q [B, 1, N, H], the query at `position` (a traced scalar) of a row of
    one document whose keys and values [B, L, K, H] are cached from position 0 in blocks of
    `sel.block` (block i: positions i * block onwards), with each block's key sum [B, M, K, H]
    (the cache's) -> out [B, 1, N, H]. The gates of all M blocks, then only the top_k blocks'
    keys: O(M * H + top_k * block * H) per head, not O(L) as the tiles of a chunk of queries.
    NSA (`sel.branches`) also needs the blocks' value sums and reads the last `sel.window`
    keys: its compressed branch is the softmax over the whole blocks' means."""
    (B, _, N, H), (L, K), b = q.shape, k.shape[1:3], sel.block
    M, G = sums.shape[1], N // K
    qf = q[:, 0].astype(jnp.float32).reshape(B, K, G, H)
    own, ids = position // b, jnp.arange(M)
    gate = jnp.einsum("BKGH,BMKH->BKGM", qf, sums / b)  # the gate of every block, per head
    if sel.branches:  # the compressed branch over the whole blocks; its probabilities rank
        p = softmax_or_zeros(jnp.where((ids + 1) * b - 1 <= position, gate * scale, -jnp.inf))
        compressed = jnp.einsum("BKGM,BMKH->BKGH", p, value_sums / b)
        gate = jnp.broadcast_to(p.sum(2, keepdims=True), p.shape)
    forced = (ids < sel.initial) | (ids > own - sel.local)
    gate = jnp.where(forced, jnp.inf, gate)
    gate = jnp.where(ids < own, gate, -jnp.inf)  # only blocks wholly before its own
    top, picked = lax.top_k(gate, min(sel.top_k - 1, M))  # [B, K, G, top_k - 1]
    mine = jnp.broadcast_to(own, picked.shape[:-1] + (1,))  # the own block, last
    picked = jnp.concatenate([picked, mine], -1)
    chosen = jnp.concatenate([top > -jnp.inf, jnp.ones(mine.shape, bool)], -1)
    key_pos = picked[..., None] * b + jnp.arange(b)  # [B, K, G, P, b]
    visible = chosen[..., None] & (key_pos <= position)  # the own block up to the query
    out = _gathered_attention(qf * scale, k, v, key_pos, visible)
    if sel.branches:
        W = min(sel.window, L)  # the window: the last W keys, the query's included
        key_pos = jnp.clip(position - W + 1, 0, L - W) + jnp.arange(W)
        key_pos = jnp.broadcast_to(key_pos, (B, K, G, 1, W))
        visible = (key_pos <= position) & (key_pos > position - sel.window)
        window = _gathered_attention(qf * scale, k, v, key_pos, visible)
        out = gated_sum(None if branch_gates is None else branch_gates[:, 0].reshape(B, K, G, 3),
                        compressed, out, window)  # fmt: skip
    return out.reshape(B, 1, N, H).astype(q.dtype)


def _gathered_attention(q_s, k, v, key_pos, visible):
    """Softmax attention of scaled queries q_s [B, K, G, H] (float32) over the cached keys and
    values [B, L, K, H] at key_pos [B, K, G, P, b] where `visible` -> [B, K, G, H] float32."""
    B, L, K, _ = k.shape
    at = (jnp.arange(B)[:, None, None, None, None], jnp.minimum(key_pos, L - 1),
          jnp.arange(K)[None, :, None, None, None])  # fmt: skip
    keys, values = k[at], v[at]  # [B, K, G, P, b, H]: only these positions are read
    scores = jnp.einsum("BKGH,BKGPbH->BKGPb", q_s, keys.astype(jnp.float32))
    scores = jnp.where(visible, scores, -jnp.inf).reshape(*visible.shape[:3], -1)
    p = jax.nn.softmax(scores, axis=-1).reshape(visible.shape)
    return jnp.einsum("BKGPb,BKGPbH->BKGH", p, values.astype(jnp.float32))


def row_blocks(segment_ids, B: int, S: int, block: int) -> Blocks:
    """Blocks of each row [B, S] (packed rows: documents are runs of equal ids)."""
    if segment_ids is None:
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (B, S)), uniform_blocks(S, block))
    return jax.vmap(lambda r: blocks(r, S, block))(run_ids(segment_ids))


class DenseBlocks(NamedTuple):
    """The blocks of self-attention rows as dense [B, T, S] relations (for references): keys
    of one document and one block, and the keys that are the first of a whole block ending at
    or before the query (they stand for NSA's compressed tokens); `local` [B, T] positions
    within the documents, `same_doc` [B, T, S]."""

    local: jax.Array
    same_doc: jax.Array
    same_block: jax.Array
    compressed: jax.Array


def dense_blocks(runs, block: int) -> DenseBlocks:
    """`DenseBlocks` of rows whose documents are the runs of `runs` [B, T]."""
    T = runs.shape[1]
    local = jnp.arange(T) - run_starts(runs)
    blk = local // block
    same_doc = runs[:, :, None] == runs[:, None, :]
    same_block = same_doc & (blk[:, :, None] == blk[:, None, :])
    whole = (same_block.sum(-1) == block) & (local % block == 0)  # [B, S]: a whole block's first
    ends = local[:, None, :] + block - 1 <= local[:, :, None]
    return DenseBlocks(local, same_doc, same_block, same_doc & whole[:, None] & ends)


def block_mean_of_each_key(db: DenseBlocks, x):
    """x [B, S, K, H] -> [B, S, K, H] float32: the mean of each key's block."""
    weights = db.same_block / db.same_block.sum(-1, keepdims=True)
    return jnp.einsum("BjJ,BJKH->BjKH", weights, x.astype(jnp.float32))


def compressed_probabilities(q, k, db: DenseBlocks, scale: float):
    """NSA's compressed branch's softmax [B, N, T, S] (nonzero only at the keys that stand for
    whole blocks ending at or before the query), from the block means of k [B, S, K, H]."""
    N, K = q.shape[2], k.shape[2]
    mean = jnp.repeat(block_mean_of_each_key(db, k), N // K, axis=2)
    s = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), mean) * scale
    return softmax_or_zeros(jnp.where(db.compressed[:, None], s, -jnp.inf))


def selected_mask(q, k, sel: Selection, runs=None, scale: float | None = None):
    """The brute-force selection as a dense mask [B, N, T, S] (T == S, self-attention; for the
    reference and tests): every query's score for every block of its document wholly before
    its own (MoBA's gate, or NSA's compressed probability summed over the group), the forced
    blocks, the top_k - 1 of them, its own block up to itself. `runs` [B, T]: document ids."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    runs = jnp.zeros((B, T), jnp.int32) if runs is None else runs
    db = dense_blocks(runs, sel.block)
    blk = db.local // sel.block  # block within the document
    if sel.scoring == "gate":
        mean = jnp.repeat(block_mean_of_each_key(db, k), N // K, axis=2)  # per query head
        gate = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), mean)
    else:
        p = compressed_probabilities(q, k, db, scale)
        gate = jnp.repeat(p.reshape(B, K, N // K, T, T).sum(2), N // K, axis=1)
    first_key = (db.local % sel.block == 0)[:, None, :]  # one entry per block: its first key
    earlier = (db.same_doc & (blk[:, None, :] < blk[:, :, None]) & first_key)[:, None]
    forced = (blk[:, None, :] < sel.initial) | (blk[:, None, :] > blk[:, :, None] - sel.local)
    gate = jnp.where(forced[:, None], jnp.inf, gate)
    gate = jnp.where(earlier, gate, -jnp.inf)
    picks = min(sel.top_k - 1, T)
    chosen = jnp.zeros(gate.shape, bool)
    if picks:  # the block starts the query picks (ties: the earlier block, as lax.top_k)
        at = lax.top_k(gate, picks)[1]
        chosen = earlier & (at[..., None] == jnp.arange(T)).any(-2)
    picked = (
        jnp.einsum("BNTJ,BjJ->BNTj", chosen.astype(jnp.float32), db.same_block.astype(jnp.float32))
        > 0
    )  # fmt: skip  (every key of them)
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    return lax.stop_gradient((db.same_block & causal)[:, None] | picked)
