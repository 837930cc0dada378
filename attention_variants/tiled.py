"""Flash-style tiled softmax attention under any tile-level mask (the engine of `blockwise`).

Online softmax over key tiles with float32 running max and sum (Rabe & Staats 2021; Dao et al.
2022, FlashAttention). A `jax.custom_vjp` saves only the output and the per-row log-sum-exp, and
its backward recomputes tile scores, so memory is O(T) in the forward and the backward.

Which tiles run is a static *schedule* built from `Mask.tile_visible`: tiles that no query can
see are never computed, and tiles that every query sees fully skip the mask. The engine walks
the schedule's (query tile, key tile) pairs in loops of compile-time length: on accelerators
many pairs per step as one batched matmul (no two of a step's pairs share a query tile in the
forward; the backward adds every pair's dQ, dK, dV into its tiles' buffers) and no branch on
the data, since each would cost a GPU a round trip to the host: in packed rows a tile of two
documents is computed with its pairs masked, and with a traced q_offset (decoding under jit)
every key tile is. On CPU, where a branch is free, pairs run one at a time and such tiles are
skipped at run time (their document ids cannot meet, or they lie outside the mask's band). A
mask that is not shift invariant (a block pattern) runs, in packed rows, the band of tiles its
`reach` allows and applies its predicate per element on positions within the document.

The forward also returns the per-row log-sum-exp; its cotangent flows into the backward
(dS = P * (dP - delta + dlse)), so partial results can be merged differentiably.

Score modifiers, per tile from the tile's positions (no [T, S] array): ALiBi's bias
-m_h |i - j| (Press et al. 2022), then Gemma 2's soft cap c tanh(s / c), both on the scaled
scores before masking; and learned sinks (gpt-oss): a value-less logit per head that opens
every row's online softmax (running max = the sink, sum = 1), with its gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_variants.common import Layout, alibi_slopes, check_positive, default_scale
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


def block_sizes(mask: Mask, segmented: bool, block_q=None, block_k=None) -> BlockSizes:
    """The tile sizes given, the mask's preferred ones (`Mask.preferred_tiles`) where None.

    The preferences are CPU measurements; on an accelerator (GPU, TPU) a preferred size is
    rounded up to what its matrix units take whole: a multiple of 128, or of 64 for a pattern
    that prefers 64 or less (a narrow window, BigBird's blocks), so that a 16-wide key tile
    does not run a matmul mostly of padding. Sizes given are kept as given."""
    preferred = mask.preferred_tiles(segmented) or dataclasses.astuple(BlockSizes())
    if jax.default_backend() != "cpu":
        preferred = [-(-p // unit) * unit for p in preferred for unit in [64 if p <= 64 else 128]]
    return BlockSizes(*(p if t is None else t for t, p in zip((block_q, block_k), preferred,
                                                                strict=True)))  # fmt: skip


class QueryCoords(NamedTuple):
    """Where the queries of each tile sit, as tiles [nq, B|1, bq] (None: not given)."""

    pos: jax.Array  # on the mask's coordinates (absolute, or within the document)
    abs: jax.Array  # absolute positions (q_offset + i)
    doc_len: jax.Array | None  # keys in the query's document (within-document masks)
    seg: jax.Array | None  # document ids


class KeyCoords(NamedTuple):
    """Where the keys of each tile sit, as tiles [nk, B|1, bk] (None: not given)."""

    pos: jax.Array
    seg: jax.Array | None


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

    def pairs(self, masked: bool, by_key: bool = False) -> np.ndarray:
        """(query tile, key tile) pairs [n, 2] that need the mask (or not), row by row of
        the query-major lists, or (by_key) of the key-major ones."""
        lists, count, full = (self.q, self.q_count, self.q_full) if by_key else (
            self.kv, self.count, self.full)  # fmt: skip
        rows = [
            (i, j)
            for i in range(len(count))
            for j in (lists[i, full[i] : count[i]] if masked else lists[i, : full[i]])
        ]
        pairs = np.array(rows, np.int32).reshape(-1, 2)
        return pairs[:, ::-1] if by_key else pairs


def steps(pairs: np.ndarray, width: int, trash: tuple[int, int], distinct: bool) -> np.ndarray:
    """`pairs` [n, 2] in steps of `width` pairs [steps, width, 2], the last padded with `trash`
    (a pair whose results land in a discarded row). With `distinct` no step holds two pairs of
    one query tile (their online softmax updates would collide): each step takes one pair from
    each of the `width` query tiles with the most pairs left."""
    if width == 1 or not distinct:
        n = -(-len(pairs) // width) * width
        padded = np.concatenate([pairs, np.tile(np.int32(trash), (n - len(pairs), 1))])
        return padded.reshape(-1, width, 2)
    left = {}
    for qi, ki in pairs:
        left.setdefault(int(qi), []).append(int(ki))
    out = []
    while left:
        rows = sorted(left, key=lambda r: -len(left[r]))[:width]
        step = [(r, left[r].pop()) for r in rows]
        left = {r: ks for r, ks in left.items() if ks}
        out.append(step + [trash] * (width - len(step)))
    return np.array(out, np.int32).reshape(-1, width, 2)


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
    q_offset (None: traced, so every tile is scheduled and masked)."""
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
    parallel: bool = False  # several tile pairs per step (accelerators; CPU: one at a time)
    ones_column: bool = True  # softmax row sums from a column of ones after V (CPU)
    alibi: bool = False  # add ALiBi's bias -m_h |i - j| to the scaled scores
    softcap: float | None = None  # then cap them: c tanh(s / c)

    @property
    def schedule(self) -> Schedule:
        return make_schedule(
            self.mask, self.T, self.S, self.bq, self.bk, self.segmented, self.q_offset
        )

    @property
    def shape(self) -> tuple[int, int]:
        return -(-self.T // self.bq), -(-self.S // self.bk)

    def width(self, pair_bytes: int) -> int:
        """Tile pairs per step: 1 on CPU; on accelerators as many as the schedule keeps busy
        (its pairs over its longest row, so few steps are padding), within WORKING_SET."""
        if not self.parallel:
            return 1
        sched = self.schedule
        busy = sched.tiles // max(int(sched.count.max(initial=0)), 1)
        return max(1, min(busy, WORKING_SET // max(pair_bytes, 1)))

    def steps(self, masked: bool, backward: bool, width: int) -> np.ndarray:
        """[steps, width, 2] (query tile, key tile) pairs of one of the engine's loops; padding
        pairs point at the row after the last (query tile nq; key tile nk in the backward)."""
        return _steps_of(self, masked, backward, width)


@functools.lru_cache(maxsize=256)
def _steps_of(st: _Static, masked: bool, backward: bool, width: int) -> np.ndarray:
    nq, nk = st.shape
    pairs = st.schedule.pairs(masked, by_key=backward)
    trash = (nq, nk) if backward else (nq, 0)
    return steps(pairs, width, trash, distinct=not backward)


# Inside the engine a query tile is [B, K, G*bq, H]: the G heads that share a key/value head
# are stacked along rows, so each tile product is one batched matmul with no repeated K/V.
# The engine's loops visit the schedule's (query tile, key tile) pairs in steps of `width`
# pairs with compile-time trip counts (`_loop`): on accelerators no branch (a pair every query
# of which is hidden is masked), on CPU free branches skip such pairs. Running results live in
# per-tile buffers with one spare row that padding pairs write to. Coordinates arrive as tiles
# (`QueryCoords`, `KeyCoords`); absolute positions at a static offset are computed per tile
# instead (cheaper for the many small tiles of a band).


def _positions(st: _Static, qi, ki, co_q: QueryCoords, co_k: KeyCoords):
    """Positions of tile (qi, ki) on the mask's coordinates: [B|1, bq, 1] and [B|1, 1, bk]."""
    if st.absolute:
        q_t = (st.q_offset + qi * st.bq + jnp.arange(st.bq))[None, :, None]  # [1, bq, 1]
        return q_t, (ki * st.bk + jnp.arange(st.bk))[None, None, :]
    return co_q.pos[qi][:, :, None], co_k.pos[ki][:, None, :]


def _rows(x, st: _Static):
    """A per-head array [N] (or [N, ...]) as tile rows [K, G*bq, ...] (heads in (K, G) order,
    each repeated over the bq positions of its rows)."""
    K = x.shape[0] // st.groups
    return jnp.repeat(x.reshape(K, st.groups, *x.shape[1:]), st.bq, axis=1).reshape(
        K, st.groups * st.bq, *x.shape[1:])  # fmt: skip


def _tile_visible(st: _Static, qi, ki, co_q: QueryCoords, co_k: KeyCoords):
    """Boolean [B|1, 1, G*bq, bk] visibility of tile (qi, ki), evaluated from positions."""
    k_index = ki * st.bk + jnp.arange(st.bk)
    q_t, k_t = _positions(st, qi, ki, co_q, co_k)
    doc_t = None if co_q.doc_len is None else co_q.doc_len[qi][:, :, None]
    vis = st.mask.visible(q_t, k_t, doc_t) & (k_index < st.S)[None, None, :]  # [B|1, bq, bk]
    if st.segmented:
        vis = vis & (co_q.seg[qi][:, :, None] == co_k.seg[ki][:, None, :])
    vis = jnp.broadcast_to(vis[:, None], (vis.shape[0], st.groups, st.bq, st.bk))
    return vis.reshape(vis.shape[0], 1, st.groups * st.bq, st.bk)


def _matmul(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _masked_scores(st, masked, q_t, k_t, qi, ki, co_q, co_k):
    """Float32 scores [B, K, G*bq, bk] of a tile, modified (ALiBi, soft cap), hidden pairs
    -inf; and the soft cap's derivative ds_capped / ds (None without a cap)."""
    s = _matmul("BKQH,BKSH->BKQS", q_t, k_t)
    if st.alibi:
        q_pos, k_pos = _positions(st, qi, ki, co_q, co_k)
        distance = jnp.abs(q_pos - k_pos).astype(jnp.float32)[:, None]  # [B|1, 1, bq, bk]
        slopes = jnp.asarray(alibi_slopes(s.shape[1] * st.groups), jnp.float32)
        slopes = slopes.reshape(-1, st.groups)[None, :, :, None, None]  # [1, K, G, 1, 1]
        bias = -(slopes * distance[:, :, None])  # [B|1, K, G, bq, bk]
        s = s + bias.reshape(bias.shape[0], s.shape[1], -1, st.bk)
    slope = None
    if st.softcap:
        t = jnp.tanh(s / st.softcap)
        s, slope = st.softcap * t, 1.0 - t * t
    if masked:
        s = jnp.where(_tile_visible(st, qi, ki, co_q, co_k), s, -jnp.inf)
    return s, slope


def _take(x, index):
    """Rows x[index] of a tile buffer (index [width] int32)."""
    if index.shape[0] == 1:  # a dynamic slice, not a gather
        return lax.dynamic_slice_in_dim(x, index[0], 1)
    return x[index]


def _put(x, index, rows, add: bool = False):
    """x with rows `rows` written to (or, with `add`, added to) x[index]."""
    if index.shape[0] == 1:
        if add:
            rows = rows + lax.dynamic_slice_in_dim(x, index[0], 1)
        return lax.dynamic_update_slice_in_dim(x, rows, index[0], 0)
    return x.at[index].add(rows) if add else x.at[index].set(rows)


WORKING_SET = 1 << 28  # bytes of score tiles one step of an accelerator's loop may hold


def _pair_bytes(q, k) -> int:
    """Bytes of float32 scores and probabilities of one (query tile, key tile) pair."""
    return 2 * 4 * int(np.prod(q.shape[1:-1])) * k.shape[-2]


def _each(fn, *args):
    """fn over the leading axis of args (one tile pair per row): vmap, or for a single pair a
    plain call (dynamic slices, not gathers)."""
    if jax.tree.leaves(args)[0].shape[0] > 1:
        return jax.vmap(fn)(*args)
    return jax.tree.map(lambda y: y[None], fn(*jax.tree.map(lambda x: x[0], args)))


def _may_meet(st: _Static, co_q: QueryCoords, co_k: KeyCoords, qi, ki):
    """Whether tile (qi, ki) can hold a visible pair, known only at run time: its query and key
    document ids overlap, and (traced offset) it meets the mask's band. None where the static
    schedule already says all (unpacked rows at a static offset)."""
    checks = []
    if st.segmented:
        seg_q, seg_k = co_q.seg[qi], co_k.seg[ki]
        checks.append((seg_q.min(-1) <= seg_k.max(-1)) & (seg_k.min(-1) <= seg_q.max(-1)))
    if st.q_offset is None:
        q_abs = co_q.abs[qi]
        k_lo, k_hi = ki * st.bk, jnp.minimum(ki * st.bk + st.bk, st.S) - 1
        checks.append(_band(q_abs.min(-1), q_abs.max(-1), k_lo, k_hi, st.mask.reach))
    return jnp.any(functools.reduce(jnp.logical_and, checks)) if checks else None


def _loop(st: _Static, backward: bool, update, operands, carried, added=(), pair_bytes=0,
          meets=None):  # fmt: skip
    """Walks the schedule's unmasked pairs, then its masked ones, in loops of compile-time
    length: update(masked, qi, ki, tiles, rows) -> (new rows, contributions).

    `operands` = (own, other): arrays tiled on the walk's own side (queries in the forward;
    keys and values in the backward) and on the other side: `tiles` = (own tiles, other tiles)
    at the pair, loaded outside any branch (a branch that captured whole arrays would cost a
    copy of them per step).
    `carried` are per-tile buffers [n + 1, ...] of the walk's own side (query tiles in the
    forward, key tiles in the backward; the spare last row holds their starting value): rows
    are their slices at the pair, replaced by the new rows. `added` are buffers of the other
    side, to which the contributions are added. On CPU (width 1) the pairs of one tile follow
    each other and its rows ride in the loop's carry (read and written once per tile); on
    accelerators each step runs `width` pairs at once (vmapped), the backward's pairs adding
    what each gives to its tile. `meets(qi, ki)` (`_may_meet`) is checked on CPU only, where a
    branch costs nothing: a tile that cannot hold a visible pair is skipped; accelerators
    never branch (each branch would cost a round trip to the host), they mask."""
    width = st.width(pair_bytes)
    side = 1 if backward else 0  # the column of a pair that indexes `carried`
    own, theirs = operands
    for masked in (False, True):
        pairs = st.steps(masked, backward, width)
        if not len(pairs):
            continue
        fn = functools.partial(update, masked)
        if st.parallel:  # accelerators: `width` pairs a step, no branch

            def body(state, pair, fn=fn):
                carried, added = state
                mine, other = pair[:, side], pair[:, 1 - side]
                rows = tuple(
                    jnp.zeros((width, *x.shape[1:]), x.dtype) if backward else _take(x, mine)
                    for x in carried
                )
                tiles = tuple(_take(x, mine) for x in own), tuple(_take(x, other) for x in theirs)
                new, more = _each(fn, pair[:, 0], pair[:, 1], tiles, rows)
                carried = tuple(
                    _put(x, mine, y, add=backward) for x, y in zip(carried, new, strict=True)
                )
                added = tuple(_put(x, other, y, add=True) for x, y in zip(added, more, strict=True))
                return (carried, added), None

            (carried, added), _ = lax.scan(body, (carried, added), pairs)
            continue
        pairs = pairs[:, 0]
        first = np.r_[True, pairs[1:, side] != pairs[:-1, side]]  # a tile's first pair
        spare = carried[0].shape[0] - 1
        fresh = tuple(x[spare] for x in carried), tuple(x[0] for x in own)

        def write(carried, at, rows):
            return tuple(lax.dynamic_update_index_in_dim(x, y, at, 0)
                         for x, y in zip(carried, rows, strict=True))  # fmt: skip

        def body(state, xs, fn=fn, masked=masked, fresh=fresh):
            carried, added, (rows, tiles), previous = state
            pair, is_first = xs
            mine, other = pair[side], pair[1 - side]

            # CPU branches are free: at a tile's first pair the previous tile's rows are
            # written and this one's read (after the unmasked loop, from the buffers), with
            # its operand tiles; in between they ride in the carry.
            def switch():
                done = write(carried, previous, rows)
                loaded = tuple(x[mine] for x in done) if masked else fresh[0]
                return done, (loaded, tuple(x[mine] for x in own))

            carried, (rows, tiles) = lax.cond(is_first, switch, lambda: (carried, (rows, tiles)))

            run = None if meets is None else meets(pair[0], pair[1])
            loaded = tiles, tuple(x[other] for x in theirs)
            compute = functools.partial(fn, pair[0], pair[1], loaded)
            if run is None:
                rows, more = compute(rows)
            else:  # only this pair's tiles pass through the branch, never a whole buffer
                nothing = tuple(jnp.zeros(x.shape[1:], x.dtype) for x in added)
                rows, more = lax.cond(run, compute, lambda rows: (rows, nothing), rows)
            added = tuple(lax.dynamic_update_index_in_dim(x, x[other] + y, other, 0)
                          for x, y in zip(added, more, strict=True))  # fmt: skip
            return (carried, added, (rows, tiles), mine), None

        state = carried, added, fresh, jnp.int32(spare)
        (carried, added, (rows, _), last), _ = lax.scan(body, state, (pairs, first))
        carried = write(carried, last, rows)
    return carried, added


def _forward(st: _Static, q, k, v, co_q, co_k, sinks=None, f32: bool = False):
    """q [nq, B, K, G*bq, H] (pre-scaled); k, v [nk, B, K, bk, H] -> out like q, lse.

    out has q's dtype, or float32 with `f32` (a partial result that a caller merges); lse
    [nq, B, K, G*bq] float32 is -inf on rows that see no key (their out is 0). `sinks` [N]
    float32: a logit per head in every row's denominator (then no row is empty).
    """
    nq, rows, H = q.shape[0], q.shape[1:-1], q.shape[-1]
    if st.ones_column:  # the PV matmul also returns the softmax row sums (CPU: one matmul)
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)

    def update(masked, qi, ki, tiles, rows):
        """One tile: running max m [B,K,Q] and sums: (sum of p [v, 1]) [B,K,Q,H+1] with the
        column of ones, else (sum of p v [B,K,Q,H], sum of p [B,K,Q])."""
        ((q_t,), (k_t, v_t)), (m, *sums) = tiles, rows
        s, _ = _masked_scores(st, masked, q_t, k_t, qi, ki, co_q, co_k)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        pv = _matmul("BKQS,BKSH->BKQH", p.astype(v.dtype), v_t)
        if st.ones_column:
            return m_new, alpha[..., None] * sums[0] + pv
        acc, l = sums
        return m_new, alpha[..., None] * acc + pv, alpha * l + p.sum(-1)

    m = jnp.full((nq + 1, *rows), -jnp.inf, jnp.float32)
    opened = 0.0  # the sum of exp(score - max) so far: with sinks, exp(sink - sink)
    if sinks is not None:
        m, opened = jnp.broadcast_to(_rows(sinks.astype(jnp.float32), st)[None], m.shape), 1.0
    if st.ones_column:
        state = m, jnp.zeros((nq + 1, *rows, H + 1), jnp.float32).at[..., H].set(opened)
    else:
        state = m, jnp.zeros((nq + 1, *rows, H), jnp.float32), jnp.full((nq + 1, *rows), opened)
    step = lambda *args: (update(*args), ())  # noqa: E731
    meets = functools.partial(_may_meet, st, co_q, co_k)
    operands = (q,), (k, v)
    state, _ = _loop(st, False, step, operands, state, pair_bytes=_pair_bytes(q, k), meets=meets)
    m, *sums = (x[:nq] for x in state)
    acc, l = (sums[0][..., :H], sums[0][..., H]) if st.ones_column else sums
    empty = l == 0.0  # rows that see no key: output zeros, lse -inf
    l = jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(l))
    out = acc / l[..., None]
    return out if f32 else out.astype(q.dtype), lse


def _backward(st: _Static, res, cotangents, f32: bool = False):
    """Recomputes tile probabilities from lse, pair by pair of the key-major schedule.

    dq is float32; dk, dv have k's and v's dtypes, or float32 with `f32` (partial sums that a
    caller adds up); d_sinks [N] float32 (None without sinks). `out` and `lse` may be those of
    a larger key set than k, v (a ring step): then dq, dk, dv are this key block's exact share
    of the full gradients."""
    q, k, v, co_q, co_k, out, lse, *rest = res
    sinks = rest[0] if rest else None
    d_out, d_lse = cotangents
    nq, nk = q.shape[0], k.shape[0]
    # dS = P * (dP - delta + dlse): delta from the output, dlse from a used log-sum-exp.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [nq, B, K, Q]
    delta = delta - jnp.where(jnp.isfinite(lse), d_lse, 0.0)
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # rows that see no key: p = 0

    def grads(masked, qi, ki, tiles, rows):
        """One tile: dk, dv [B, K, bk, H] of key tile ki with this pair's shares added, and
        the pair's share of dq [B, K, G*bq, H]."""
        ((k_t, v_t), (q_t, do_t, lse_t, delta_t)), (dk, dv) = tiles, rows
        s, slope = _masked_scores(st, masked, q_t, k_t, qi, ki, co_q, co_k)
        p = jnp.exp(s - lse_t[..., None])  # [B, K, G*bq, bk]
        dv = dv + _matmul("BKQS,BKQH->BKSH", p.astype(v.dtype), do_t)
        dp = _matmul("BKQH,BKSH->BKQS", do_t, v_t)
        ds = p * (dp - delta_t[..., None])
        ds = (ds if slope is None else ds * slope).astype(q.dtype)  # through the soft cap
        dk = dk + _matmul("BKQS,BKQH->BKSH", ds, q_t)
        return (dk, dv), (_matmul("BKQS,BKSH->BKQH", ds, k_t),)

    zeros = lambda x, n: jnp.zeros((n + 1, *x.shape[1:]), jnp.float32)  # noqa: E731
    carried, added = (zeros(k, nk), zeros(v, nk)), (zeros(q, nq),)
    meets = functools.partial(_may_meet, st, co_q, co_k)
    operands = (k, v), (q, d_out, lse, delta)
    (dk, dv), (dq,) = _loop(st, True, grads, operands, carried, added, 2 * _pair_bytes(q, k), meets)
    dq, dk, dv = dq[:nq], dk[:nk], dv[:nk]
    d_sinks = None
    if sinks is not None:  # d sink = sum over rows of p_sink * (0 - delta): it has no value
        p_sink = jnp.exp(_rows(sinks.astype(jnp.float32), st) - lse)  # [nq, B, K, G*bq]
        d_sinks = -(p_sink * delta).sum((0, 1)).reshape(-1, st.groups, st.bq).sum(-1)
        d_sinks = d_sinks.reshape(-1).astype(sinks.dtype)
    if not f32:
        dk, dv = dk.astype(k.dtype), dv.astype(v.dtype)
    return dq, dk, dv, d_sinks


def _tiled_bwd(st, res, cotangents):
    dq, dk, dv, d_sinks = _backward(st, res, cotangents)
    return dq.astype(res[0].dtype), dk, dv, None, None, d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled(st, q, k, v, co_q, co_k, sinks):
    return _forward(st, q, k, v, co_q, co_k, sinks)


def _tiled_fwd(st, q, k, v, co_q, co_k, sinks):
    out, lse = _forward(st, q, k, v, co_q, co_k, sinks)
    return (out, lse), (q, k, v, co_q, co_k, out, lse, sinks)


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


def plan(T: int, N: int, S: int, K: int, mask: Mask, lay: Layout, block_sizes: BlockSizes,
         alibi: bool = False, softcap: float | None = None):  # fmt: skip
    """The static description of a call of T queries (N heads) over S keys (K heads), and its
    coordinate tiles: (st, co_q, co_k) for `attend_tiles` / `attend_tiles_grads`."""
    bq, bk = min(block_sizes.block_q, T), min(block_sizes.block_k, S)
    absolute = lay.q_offset is not None and not lay.within_document
    cpu = jax.default_backend() == "cpu"
    st = _Static(mask, T, S, bq, bk, N // K, lay.segmented, lay.q_offset, absolute,
                 parallel=not cpu, ones_column=cpu, alibi=alibi, softcap=softcap)  # fmt: skip
    co_q = QueryCoords(*(_coordinate_tiles(x, bq) for x in (lay.q_pos, lay.q_abs, lay.doc_len,
                                                             lay.q_seg)))  # fmt: skip
    co_k = KeyCoords(*(_coordinate_tiles(x, bk) for x in (lay.k_pos, lay.k_seg)))
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
    bias: str | None = None,
    softcap: float | None = None,
    sink_logits=None,
):
    """Softmax attention of q [B,T,N,H] over k, v [B,S,K,H] under `mask`, tile by tile.

    `lay` places queries and keys (`common.layout`). Returns out [B, T, N, H] and, with
    `return_lse`, lse [B, T, N] float32 (-inf on rows that see no key). Modifiers (module
    docstring): `bias="alibi"`, `softcap` c > 0, `sink_logits` [N].
    """
    st, co_q, co_k = plan(*q.shape[1:3], *k.shape[1:3], mask, lay, block_sizes,
                          alibi=bias == "alibi", softcap=softcap)  # fmt: skip
    T, G = st.T, st.groups
    tiles = to_tiles(scaled(q, scale), st.bq, G), to_tiles(k, st.bk, 1), to_tiles(v, st.bk, 1)
    out, lse = _tiled(st, *tiles, co_q, co_k, sink_logits)
    out = from_tiles(out, T, G)
    if not return_lse:
        return out
    return out, from_tiles(lse[..., None], T, G)[..., 0]


# The engine on tiles, for callers that keep their operands tiled across calls (`ring.py`):
# q tiles pre-scaled, out and gradients float32 (of the scaled q), lse -inf on rows that see
# no key.
attend_tiles = functools.partial(_forward, f32=True)


def attend_tiles_grads(st: _Static, res, cotangents):
    return _backward(st, res, cotangents, f32=True)[:3]
