"""`ring`: exact attention with the sequence sharded over a mesh axis (Liu et al. 2023).

Each device of the `seq` axis keeps its queries; the key/value blocks travel around the axis
with `lax.ppermute`, one hop per step, while the block in hand runs through a step engine;
partial results merge with their log-sum-exps in float32. The engines: the tiled engine
(`tiled.py`, implementation "ring", every backend) and splash attention ("ring_splash", which
"auto" picks on TPU; `accelerators.SplashRingSteps`). Everything stays in the engine's layout
from the first step to the last (queries laid out once, key/value blocks travel); the tiled
engine's steps take whole tiles, so none copies its operands. The backward rings too: each
block's dK/dV accumulators travel with it and arrive home after a full turn, so memory per
device is O(T / devices) in the forward and the backward; a step's backward starts from the
ring's global out and lse (each block's own would give wrong gradients).

Causal load balance. With `layout="contiguous"` device i holds the i-th slice of the sequence
and sees only the blocks of devices j <= i: the last device does about 2n - 1 times the work of
the first (twice the mean), and every step waits for it. With `layout="zigzag"` (the default;
the two-chunk scheme of Llama 3's context parallelism, Dubey et al. 2024) the sequence is cut
into 2n chunks and device i holds chunks i and 2n-1-i, one early and one late: at every step
each device runs half a block of work (its own block causally; an earlier device's first chunk
with all its queries; a later device's keys with its late chunk only), and the rest is skipped.
`tile_work` counts it.

The mesh is JAX's current one (`jax.set_mesh(mesh)`) and the axis is found by name (`axis`).
Outside a mesh, on an axis of size 1, or for a call the ring does not serve (decoding offsets,
kv_segment_ids, T != S) the variant runs on one device like `blockwise` (the accelerator rows,
then the tiled engine). The mesh's other axes
(say `data`) split the batch when it divides by them; heads are not split. Everything the ring
does to its inputs (run ids of segment ids, the zigzag reordering) happens on the shards, so
inputs already sharded over the axis never gather; T must be a multiple of the number of chunks
(2n zigzag, n contiguous).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from attention_variants.accelerators import SplashRingSteps, splash_ring_unserved, table
from attention_variants.common import (
    batch_axes,
    beyond_self_attention,
    check_ids,
    check_inputs,
    contract,
    default_scale,
    layout,
    placed,
    widened,
)
from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Causal, Mask, causal_or_full
from attention_variants.registry import Implementation, register, spec
from attention_variants.tiled import (
    BlockSizes,
    attend_tiles,
    attend_tiles_grads,
    from_tiles,
    plan,
    scaled,
    to_tiles,
)

LAYOUTS = ("zigzag", "contiguous")


class Relation(enum.IntEnum):
    """Where the key/value block a device holds at a step came from."""

    OWN = 0  # the device's own block
    EARLIER = 1  # a block of an earlier device (earlier positions)
    LATER = 2  # a block of a later device


def axis_size(axis: str) -> int:
    """The size of mesh axis `axis` in the current mesh (1 outside a mesh or without it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def chunking(n: int, layout: str, causal: bool) -> tuple[str, int]:
    """(the layout a ring of n devices runs, the number of chunks it cuts a row into): the
    balance matters only when causal, so a full ring runs contiguous."""
    order = layout if causal else "contiguous"
    return order, 2 * n if order == "zigzag" else n


def tile_sizes(L: int, layout: str, block_sizes: BlockSizes) -> BlockSizes:
    """The tiles of a ring over shards of L positions: as asked (at most L); with the zigzag
    layout the largest that divide L / 2, so that a step can take half of a shard's tiles."""
    span = L // 2 if layout == "zigzag" else L

    def size(name: str, block: int) -> int:
        if layout != "zigzag":
            return min(block, L)
        tile = max(d for d in range(1, min(block, span) + 1) if span % d == 0)
        if tile * 8 < min(block, span):  # e.g. a prime half shard: tiles of 1
            raise ValueError(
                f"ring: a half shard of T/2n={span} positions has no divisor near {name}="
                f"{block} (the largest is {tile}); choose T with T/2n a multiple of a power of "
                "two, or layout='contiguous'"
            )
        return tile

    return BlockSizes(size("block_q", block_sizes.block_q), size("block_k", block_sizes.block_k))


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Everything static about one ring call: L positions per device, tiles, head grouping."""

    axis: str
    n: int
    layout: str
    causal: bool
    scale: float | None
    tiles: BlockSizes  # `tile_sizes`: they divide what a step slices
    L: int
    heads: tuple[int, int]  # N query heads, K key/value heads
    inner: str = "jax"  # the engine of a step: "jax" (the tiled engine) or "splash"

    def parts(self, relation: Relation):
        """What a step computes: (query rows, key rows, mask), or None when it is skipped."""
        everything = slice(0, self.L)
        if not self.causal:
            return everything, everything, Mask()
        if relation == Relation.OWN:  # both layouts keep positions increasing within a device
            return everything, everything, Causal()
        if self.layout == "contiguous":
            return (everything, everything, Mask()) if relation == Relation.EARLIER else None
        half = self.L // 2  # zigzag: chunks (i, 2n-1-i) against (j, 2n-1-j)
        if relation == Relation.EARLIER:  # j < i: every query sees the early chunk j only
            return everything, slice(0, half), Mask()
        return slice(half, self.L), everything, Mask()  # j > i: only the late chunk sees it

    def relations(self) -> tuple[Relation, ...]:
        """The relations a step can have (a full ring treats every block alike)."""
        return tuple(Relation) if self.causal else (Relation.OWN,)

    def steps(self):
        """The engine of each step (`_Tiled` or the splash steps), bound to this ring."""
        return SplashRingSteps(self) if self.inner == "splash" else _Tiled(self)


class _Tiled:
    """A ring's steps on the tiled engine (`tiled.py`), in its tile layout from the first step
    to the last: queries [nq, B, K, G*bq, H], keys and values [nk, B, K, bk, H], lse rows
    [nq, B, K, G*bq]; a step takes whole tiles (the ring's `tile_sizes` divide its slices).

    Every engine of the ring has these methods: the layout's conversions (`queries`, `keys`
    and back) and a step's `forward` and `grads` on the block in hand (never a skipped one).
    """

    def __init__(self, ring: _Ring):
        self.ring, self.G = ring, ring.heads[0] // ring.heads[1]

    def queries(self, x):
        return to_tiles(x, self.ring.tiles.block_q, self.G)

    def keys(self, x):
        return to_tiles(x, self.ring.tiles.block_k, 1)

    def from_queries(self, x):
        return from_tiles(x, self.ring.L, self.G)

    def from_keys(self, x):
        return from_tiles(x, self.ring.L, 1)

    def step(self, relation: Relation, q_seg, k_seg):
        """(query tiles, key tiles, plan) of a step, or None when it is skipped."""
        parts = self.ring.parts(relation)
        if parts is None:
            return None
        rows, cols, mask = parts
        T, S = rows.stop - rows.start, cols.stop - cols.start
        B = 1 if q_seg is None else q_seg.shape[0]
        shape = (jax.ShapeDtypeStruct((B, T, 1, 1), jnp.float32),
                 jax.ShapeDtypeStruct((B, S, 1, 1), jnp.float32))  # fmt: skip
        if q_seg is None:
            lay = layout(*shape)
        else:
            lay = layout(*shape, segment_ids=q_seg[:, rows], kv_segment_ids=k_seg[:, cols])
        bq, bk = self.ring.tiles.block_q, self.ring.tiles.block_k
        tile_rows = slice(rows.start // bq, -(-rows.stop // bq))
        tile_cols = slice(cols.start // bk, -(-cols.stop // bk))
        heads = self.ring.heads
        return tile_rows, tile_cols, plan(T, heads[0], S, heads[1], mask, lay, self.ring.tiles)

    def forward(self, relation: Relation, q, kv, q_seg):
        """Float32 out and lse tiles (lse -inf on rows that see nothing) of the local query
        tiles over one block of key tiles."""
        k, v, k_seg = kv
        rows, cols, (st, co_q, co_k) = self.step(relation, q_seg, k_seg)
        o, l = attend_tiles(st, q[rows], k[cols], v[cols], co_q, co_k)
        return widened(o, rows, len(q)), widened(l, rows, len(q), -jnp.inf)

    def grads(self, relation: Relation, q, kv, q_seg, out, lse, d_out, d_lse):
        """Float32 (dq, dk, dv) tiles: the share of the gradients that one key block gives."""
        k, v, k_seg = kv
        rows, cols, (st, co_q, co_k) = self.step(relation, q_seg, k_seg)
        res = (q[rows], k[cols], v[cols], co_q, co_k, out[rows], lse[rows])
        gq, gk, gv = attend_tiles_grads(st, res, (d_out[rows], d_lse[rows]))
        return widened(gq, rows, len(q)), widened(gk, cols, len(k)), widened(gv, cols, len(k))


def _relation(step, n: int, axis: str):
    """The `Relation` (as an int) of the block that device i holds at `step` (it came from
    device i - step)."""
    i = lax.axis_index(axis)
    j = (i - step) % n
    later = jnp.where(j < i, Relation.EARLIER, Relation.LATER)
    return jnp.where(step == 0, Relation.OWN, later)


def _switch(cfg: _Ring, step, fn, skipped, *args):
    """fn(relation, *args) for the relation of the block in hand at `step`; skipped(*args)
    where that relation computes nothing (`_Ring.parts`)."""
    branches = [skipped if cfg.parts(r) is None else functools.partial(fn, r)
                for r in cfg.relations()]  # fmt: skip
    if len(branches) == 1:
        return branches[0](*args)
    return lax.switch(_relation(step, cfg.n, cfg.axis), branches, *args)


def _pass_on(cfg: _Ring, x):
    """Sends x (a pytree) one hop along the ring: device i to device i + 1."""
    pairs = [(j, (j + 1) % cfg.n) for j in range(cfg.n)]
    return jax.tree.map(lambda a: lax.ppermute(a, cfg.axis, pairs), x)


def _merge(out, lse, o, l):
    """Softmax results over two key sets -> over their union (float32, empty rows stay 0)."""
    new = jnp.logaddexp(lse, l)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    out = out * jnp.exp(lse - safe)[..., None] + o * jnp.exp(l - safe)[..., None]
    return out, new


def _forward(cfg: _Ring, q, k, v, seg):
    """The local queries over every block of the ring (in the steps' layout throughout):
    float32 out and lse (-inf on rows that see nothing)."""

    def nothing(q, *_):
        return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:-1], -jnp.inf)

    def attend(s, kv):
        return _switch(cfg, s, cfg.steps().forward, nothing, q, kv, seg)

    def step(s, carry):  # the block in hand is computed while it is sent on
        out, lse, kv = carry
        arriving = _pass_on(cfg, kv)
        return (*_merge(out, lse, *attend(s, kv)), arriving)

    out, lse = nothing(q)
    out, lse, kv = lax.fori_loop(0, cfg.n - 1, step, (out, lse, (k, v, seg)))
    return _merge(out, lse, *attend(cfg.n - 1, kv))


def _backward(cfg: _Ring, q, k, v, seg, out, lse, d_out, d_lse):
    """Rings the blocks again; each block's dK/dV travel with it and arrive home at the end."""

    def nothing(q, kv, *_):
        return tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, *kv[:2]))

    def share(s, kv):
        return _switch(cfg, s, cfg.steps().grads, nothing, q, kv, seg, out, lse, d_out, d_lse)

    def step(s, carry):
        dq, kv, (dk, dv) = carry
        arriving = _pass_on(cfg, kv)
        gq, gk, gv = share(s, kv)
        return dq + gq, arriving, _pass_on(cfg, (dk + gk, dv + gv))

    zeros = [jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)]
    start = zeros[0], (k, v, seg), (zeros[1], zeros[2])
    dq, kv, (dk, dv) = lax.fori_loop(0, cfg.n - 1, step, start)
    gq, gk, gv = share(cfg.n - 1, kv)
    dk, dv = _pass_on(cfg, (dk + gk, dv + gv))  # the last hop brings them home
    return dq + gq, dk, dv


def _reordered(cfg: _Ring, *xs, inverse: bool = False):
    """xs in the layout's order along the sequence (zigzag), or back; None stays None."""
    if cfg.layout != "zigzag":
        return xs
    return tuple(None if x is None else _zigzag(x, cfg.n, cfg.axis, inverse) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_local(cfg: _Ring, q, k, v, seg):
    """The ring on this device's contiguous slice: reorders, lays out, rings, and back."""
    return _ring_local_fwd(cfg, q, k, v, seg)[0]


def _ring_local_fwd(cfg, q, k, v, seg):
    steps = cfg.steps()
    q, k, v, seg = _reordered(cfg, q, k, v, seg)
    laid = steps.queries(scaled(q, cfg.scale)), steps.keys(k), steps.keys(v)
    out, lse = _forward(cfg, *laid, seg)  # the keys' ids travel with them
    result = steps.from_queries(out).astype(q.dtype), steps.from_queries(lse[..., None])[..., 0]
    return _reordered(cfg, *result, inverse=True), (*laid, seg, out.astype(q.dtype), lse)


def _ring_local_bwd(cfg, res, cotangents):
    """The ring's backward in the steps' layout and the layout's order; gradients back."""
    steps, (q, k, v, seg, out, lse) = cfg.steps(), res
    d_out, d_lse = _reordered(cfg, *cotangents)
    d_out, d_lse = steps.queries(d_out), steps.queries(d_lse[..., None])[..., 0]
    dq, dk, dv = _backward(cfg, q, k, v, seg, out, lse, d_out, d_lse)
    dq = steps.from_queries(dq) * default_scale(cfg.scale, dq.shape[-1])
    dk, dv = steps.from_keys(dk), steps.from_keys(dv)
    grads = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
    return (*_reordered(cfg, *grads, inverse=True), None)


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def _zigzag(x, n: int, axis: str, inverse: bool = False):
    """Inside the ring: device i's contiguous chunks (2i, 2i+1) of 2n -> (i, 2n-1-i), or back.

    Two `ppermute`s move every chunk once: the even chunks in one, the odd ones in the other.
    """
    i = lax.axis_index(axis)
    home = [c if c < n else 2 * n - 1 - c for c in range(2 * n)]  # the device chunk c goes to
    first, second = jnp.split(x, 2, axis=1)
    i_even = i % 2 == 0  # device i's chunk i is even when i is
    if not inverse:
        even = lax.ppermute(first, axis, [(d, home[2 * d]) for d in range(n)])
        odd = lax.ppermute(second, axis, [(d, home[2 * d + 1]) for d in range(n)])
        return jnp.where(i_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))
    held = [(d, 2 * n - 1 - d) if d % 2 == 0 else (2 * n - 1 - d, d) for d in range(n)]
    mine = jnp.where(i_even, first, second), jnp.where(i_even, second, first)  # (even, odd)
    even, odd = (
        lax.ppermute(x, axis, [(d, held[d][parity] // 2) for d in range(n)])
        for parity, x in enumerate(mine)
    )
    return jnp.concatenate([even, odd], 1)


def _run_ids(ids, n: int, axis: str):
    """Inside the ring: `common.run_ids` of the whole row from each device's contiguous slice."""
    i = lax.axis_index(axis)
    before = lax.ppermute(ids[:, -1:], axis, [(d, d + 1) for d in range(n - 1)])
    starts = jnp.concatenate([(ids[:, :1] != before) | (i == 0), ids[:, 1:] != ids[:, :-1]], 1)
    local = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    totals = lax.all_gather(local[:, -1], axis)  # [n, B]: runs started on each device
    earlier = jnp.sum(jnp.where(jnp.arange(n)[:, None] < i, totals, 0), axis=0)
    return earlier[:, None] + local - 1


def unserved(q, k, v, *, axis="seq", layout="zigzag", causal=True, block_q=512, block_k=512,
             **call):  # fmt: skip
    """Why the ring cannot serve a call (None: it can): the "auto" fallback to blockwise. A
    current mesh without the axis also warns: the user likely named the axis otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and axis not in mesh.axis_names:
        missing = (f"a mesh axis named {axis!r} (the current mesh has {mesh.axis_names}; pass "
                   "axis=)")  # fmt: skip
        warnings.warn(f"ring: no {missing}: running as blockwise on each device", stacklevel=2)
        return missing
    if axis_size(axis) == 1:
        return f"a current mesh (jax.set_mesh) with an axis {axis!r} of size > 1"
    beyond = beyond_self_attention(q, k, call)
    if beyond is not None:
        return beyond
    return unfit_rows(q.shape[1], axis_size(axis), layout, causal, block_q, block_k)


def unfit_rows(T: int, n: int, layout: str, causal: bool, block_q: int, block_k: int) -> str | None:
    """Why rows of T positions cannot be cut for a ring of n devices (None: they can)."""
    order, chunks = chunking(n, layout, causal)
    if T % chunks:
        return (f"T={T} (a multiple of {chunks} is needed: {order} layout over {n} devices; pad "
                "the rows or choose another length)")  # fmt: skip
    try:
        tile_sizes(T // n, order, BlockSizes(block_q, block_k))
    except ValueError as e:
        return str(e)
    return None


def _attend(q, k, v, call, options, inner="jax"):
    """Sequence-parallel exact attention over the mesh axis `axis` (see the module doc)."""
    check_inputs(q, k, v)
    axis, n = options["axis"], axis_size(options["axis"])
    causal, tiles = call["causal"], BlockSizes(options["block_q"], options["block_k"])
    order, _ = chunking(n, options["layout"], causal)
    B, T, N, _ = q.shape
    unfit = unfit_rows(T, n, options["layout"], causal, options["block_q"], options["block_k"])
    if unfit is not None:
        raise ValueError(f"ring over the {axis!r} axis: {unfit}")
    L = T // n
    heads = (N, k.shape[2])
    tiles = tile_sizes(L, order, tiles)
    cfg = _Ring(axis, n, order, causal, call["scale"], tiles, L, heads, inner)
    args = [q, k, v]
    if call["segment_ids"] is not None:
        check_ids("segment_ids", call["segment_ids"], (B, T))
        args.append(call["segment_ids"].astype(jnp.int32))

    def local(q, k, v, ids=None):
        seg = None if ids is None else _run_ids(ids, n, axis)  # documents are runs of ids
        return _ring_local(cfg, q, k, v, seg)

    sharded = PartitionSpec(batch_axes(B, exclude=axis), axis)
    out, lse = jax.shard_map(
        local,
        in_specs=(sharded,) * len(args),
        out_specs=(sharded, sharded),
        check_vma=False,  # the tiled engine's loop carries start replicated; the vjp is ours
    )(*(placed(x, sharded) for x in args))
    return (out, lse) if call["return_lse"] else out


def tile_work(T: int, n: int, *, layout: str = "zigzag", causal: bool = True,
              block_sizes: BlockSizes = BlockSizes()) -> np.ndarray:  # fmt: skip
    """Tiles the engine computes on each of n devices over a whole ring (int [n]).

    Counted from the same tile schedules the kernel runs (`tiled.make_schedule`), so max / mean
    is the causal imbalance of the layout.
    """
    order, chunks = chunking(n, layout, causal)
    L = -(-T // chunks) * chunks // n
    cfg = _Ring("seq", n, order, causal, None, tile_sizes(L, order, block_sizes), L, (1, 1))
    work = np.zeros(n, np.int64)
    for i in range(n):
        for s in range(n):
            j = (i - s) % n
            relation = Relation.OWN if s == 0 else Relation.EARLIER if j < i else Relation.LATER
            step = _Tiled(cfg).step(relation, None, None)
            work[i] += 0 if step is None else step[2][0].schedule.tiles
    return work


def _attend_on_splash(q, k, v, call, options):
    """The ring with its steps on splash attention (see the module doc)."""
    return _attend(q, k, v, call, options, inner="splash")


ring_attention = contract(_attend)
ring_splash = contract(_attend_on_splash)


def _splash_unserved(q, k, v, *, causal=True, axis="seq", layout="zigzag", **call):
    """Why the ring cannot run its steps on splash for this call (None: it can)."""
    missing = unserved(q, k, v, axis=axis, layout=layout, causal=causal, **call)
    if missing is not None:
        return missing
    return splash_ring_unserved(q.shape[1], chunking(axis_size(axis), layout, causal)[1])


def _implementations(kernels):
    """The ring (its steps on splash on TPU, else on the tiled engine), then what runs on one
    device: the accelerator rows of a causal or full mask, and the tiled engine."""
    return {
        "ring_splash": Implementation(ring_splash, supports=_splash_unserved, auto=("tpu",)),
        "ring": Implementation(ring_attention, supports=unserved),
        **table(kernels),
        "jax": Implementation(kernels.tiled),
    }


@register(
    "ring",
    family=MaskedSoftmax(tiles=BlockSizes(), implementations=_implementations),
    long_context=True,
    # one device runs blockwise's engine (its test options tile it); tests/test_mesh.py rings
)
def ring(*, causal: bool, axis: str = "seq", layout: str = "zigzag") -> Mask:
    """Causal (or full) attention with the sequence sharded over mesh axis `axis`."""
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a mesh axis name (a str), got axis={axis!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got layout={layout!r}")
    return causal_or_full(causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised causal mask.
reference = spec("ring").reference
