"""Content-selected key blocks: each query attends to the blocks its own content picks.

MoBA (Lu et al. 2025, "Mixture of Block Attention"): the keys of a document are split into
blocks of `block` positions; a query's gate for each block wholly before its own is
g = q . mean(K_block) (unscaled, float32); it attends causally to its own block and to the
`top_k - 1` highest-gated earlier blocks (all of them when there are fewer). The selection has
no gradient; the attention over the selected keys has.

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
O(T * top_k * H).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants.common import Layout, run_ids, run_starts
from attention_variants.masks import Fixed, Mask, Window, check_int
from attention_variants.tiled import block_sizes, tiled_attention


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a block-selection variant declares: blocks of `block` key positions within each
    document, `top_k` blocks per query counting its own."""

    block: int
    top_k: int

    def __post_init__(self):
        check_int("block", self.block)
        check_int("top_k", self.top_k)


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


def _select(st: _Static, q, q_pos, bl: Blocks, means):
    """The earlier blocks each query of a chunk picks: [Q, N, top_k - 1] block ids (-1: none).
    q [Q, N, H], q_pos [Q]; means [M, K, H] float32, one row per block."""
    own, first = bl.index[q_pos], bl.first[q_pos]
    rows = means.shape[0]
    span = min(rows, -(-bl.index.shape[0] // st.sel.block) + q.shape[0])
    w0 = jnp.clip(own[0] - (span - q.shape[0]), 0, rows - span)  # the chunk's candidates
    window = lax.dynamic_slice_in_dim(means, w0, span)  # [span, K, H]
    heads = jnp.arange(q.shape[1]) // st.groups
    gate = jnp.einsum("QNH,SNH->QNS", q.astype(jnp.float32), window[:, heads])
    ids = w0 + jnp.arange(span)
    candidate = (ids[None] >= first[:, None]) & (ids[None] < own[:, None])  # [Q, span]
    gate = jnp.where(candidate[:, None], gate, -jnp.inf)
    top, at = lax.top_k(gate, min(st.sel.top_k - 1, span))
    chosen = jnp.where(top > -jnp.inf, w0 + at, -1)
    return jnp.pad(chosen, ((0, 0), (0, 0), (0, st.sel.top_k - 1 - chosen.shape[-1])),
                   constant_values=-1)  # fmt: skip


def selections(st: _Static, q, q_pos, bl: Blocks, means):
    """[T, N, top_k - 1] picked blocks of one row, `chunk` queries at a time."""
    T, pad = q.shape[0], -q.shape[0] % st.chunk
    q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos, (0, pad), mode="edge")  # padded queries: the last one's blocks
    picked = lax.map(
        lambda xs: _select(st, *xs, bl, means),
        (q.reshape(-1, st.chunk, *q.shape[1:]), q_pos.reshape(-1, st.chunk)),
    )
    return picked.reshape(-1, *picked.shape[2:])[:T]


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
    st = _Static(sel, min(chunk, T), N // K, tile, tiles)
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


def step_attention(q, k, v, sums, position, sel: Selection, *, scale: float):
    """One decoding step: q [B, 1, N, H], the query at `position` (a traced scalar) of a row of
    one document whose keys and values [B, L, K, H] are cached from position 0 in blocks of
    `sel.block` (block i: positions i * block onwards), with each block's key sum [B, M, K, H]
    (the cache's) -> out [B, 1, N, H]. The gates of all M blocks, then only the top_k blocks'
    keys: O(M * H + top_k * block * H) per head, not O(L) as the tiles of a chunk of queries."""
    (B, _, N, H), (L, K), b = q.shape, k.shape[1:3], sel.block
    M, G = sums.shape[1], N // K
    qf = q[:, 0].astype(jnp.float32).reshape(B, K, G, H)
    own = position // b
    gate = jnp.einsum("BKGH,BMKH->BKGM", qf, sums / b)  # the gate of every block, per head
    gate = jnp.where(jnp.arange(M) < own, gate, -jnp.inf)  # only blocks wholly before its own
    top, picked = lax.top_k(gate, min(sel.top_k - 1, M))  # [B, K, G, top_k - 1]
    mine = jnp.broadcast_to(own, picked.shape[:-1] + (1,))  # the own block, last
    picked = jnp.concatenate([picked, mine], -1)
    chosen = jnp.concatenate([top > -jnp.inf, jnp.ones(mine.shape, bool)], -1)
    key_pos = picked[..., None] * b + jnp.arange(b)  # [B, K, G, P, b]
    at = (jnp.arange(B)[:, None, None, None, None], jnp.minimum(key_pos, L - 1),
          jnp.arange(K)[None, :, None, None, None])  # fmt: skip
    keys, values = k[at], v[at]  # [B, K, G, P, b, H]: only the picked blocks are read
    scores = jnp.einsum("BKGH,BKGPbH->BKGPb", qf * scale, keys.astype(jnp.float32))
    visible = chosen[..., None] & (key_pos <= position)  # the own block up to the query
    scores = jnp.where(visible, scores, -jnp.inf).reshape(B, K, G, -1)
    p = jax.nn.softmax(scores, axis=-1).reshape(visible.shape)
    out = jnp.einsum("BKGPb,BKGPbH->BKGH", p, values.astype(jnp.float32))
    return out.reshape(B, 1, N, H).astype(q.dtype)


def row_blocks(segment_ids, B: int, S: int, block: int) -> Blocks:
    """Blocks of each row [B, S] (packed rows: documents are runs of equal ids)."""
    if segment_ids is None:
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (B, S)), uniform_blocks(S, block))
    return jax.vmap(lambda r: blocks(r, S, block))(run_ids(segment_ids))


def selected_mask(q, k, sel: Selection, runs=None):
    """MoBA's brute-force selection as a dense mask [B, N, T, S] (T == S, self-attention; for
    the reference and tests): every query's gate for every block of its document wholly before
    its own, the top_k - 1 of them, its own block up to itself. `runs` [B, T]: document ids."""
    B, T, N, _ = q.shape
    K = k.shape[2]
    runs = jnp.zeros((B, T), jnp.int32) if runs is None else runs
    local = jnp.arange(T) - run_starts(runs)  # position within the document
    blk = local // sel.block  # block within the document
    same_doc = runs[:, :, None] == runs[:, None, :]  # [B, T, S]
    same_block = same_doc & (blk[:, :, None] == blk[:, None, :])
    mean = jnp.einsum(
        "BjJ,BJKH->BjKH", same_block / same_block.sum(-1, keepdims=True), k.astype(jnp.float32)
    )  # fmt: skip  (the mean key of key j's block)
    mean = jnp.repeat(mean, N // K, axis=2)  # per query head: its key/value head's
    gate = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), mean)
    first_key = (local % sel.block == 0)[:, None, :]  # one entry per block: its first key
    earlier = (same_doc & (blk[:, None, :] < blk[:, :, None]) & first_key)[:, None]
    gate = jnp.where(earlier, gate, -jnp.inf)
    picks = min(sel.top_k - 1, T)
    chosen = jnp.zeros(gate.shape, bool)
    if picks:
        least = lax.top_k(gate, picks)[0][..., -1:]  # the k-1-th largest gate (-inf: fewer)
        chosen = earlier & (gate >= least)  # block starts the query picks
    picked = (
        jnp.einsum("BNTJ,BjJ->BNTj", chosen.astype(jnp.float32), same_block.astype(jnp.float32)) > 0
    )  # fmt: skip  (every key of them)
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    return lax.stop_gradient((same_block & causal)[:, None] | picked)
