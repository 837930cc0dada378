"""Accelerator rows of a masked-softmax variant's implementation table: its mask, handed to a
well-kept fused kernel.

* `splash`: JAX's Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu`). Causal,
  window and full masks become its `CausalMask` / `LocalMask` / `FullMask`, computed inside the
  kernel; any other mask (the fixed pattern, BigBird) a splash mask read block by block at
  trace time (an empty or full block from the mask's O(1) `tile_visible` / `tile_full`, a
  partial one from its `visible`), which splash keeps as partial blocks (deduplicated: a
  regular pattern has a few, BigBird's random blocks many) and skips where empty. A mask must
  show each query its own position (splash has no empty rows). Packed rows become `SegmentIds`
  (run ids), GQA runs the MQA kernel per key/value head. Soft-capping and learned sinks are
  splash's own arguments (`attn_logits_soft_cap`, `sinks`, with their gradients); ALiBi is
  not. "auto" picks it on TPU; elsewhere an explicit request runs it in interpret mode (slow:
  for tests). T and S must be multiples of 128 (its key tiles are whole lanes).
* `cudnn`: cuDNN's fused flash kernel through `jax.nn.dot_product_attention`: causal, full and
  causal-window masks, GQA, bfloat16/float16. A window is always passed with the causal flag: a
  window without it attends to the future in cuDNN (jax PR #39576), so a window that reaches
  ahead is not served.
* `tokamax`: the Pallas GPU kernels of tokamax (`pip install '.[gpu]'`; Mosaic GPU, then
  Triton): causal, full and window masks (either side), GQA, and packed rows (`segment_ids`)
  in bfloat16/float16 from Hopper on: each query's document, cut to its window, is a key range
  [k_start, k_end), which tokamax's mask takes per query, so a packed training row stays on
  the fused kernel (Mosaic; elsewhere tokamax runs Triton, whose backward would build a dense
  [B, T, S] mask from the ranges, so packed rows fall back to the engine there).

cuDNN and tokamax need an NVIDIA GPU. On GPU "auto" times `cudnn` against `tokamax` for each
call signature and keeps the faster (`registry.fastest`; a rival that fails there is dropped);
packed rows go to tokamax, as JAX's public cuDNN call takes no segment ids. None of them takes
kv_segment_ids, decoding offsets, T != S or return_lse: "auto" falls back to the portable "jax"
engine there, and an explicit request raises NotImplementedError naming the missing feature.
Under a current mesh of several devices (`jax.set_mesh`) each runs per device in a `shard_map`
over the mesh axes that split the batch: XLA cannot partition a Pallas or cuDNN call itself.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import PartitionSpec

from attention_variants.common import (
    batch_axes,
    beyond_self_attention,
    contract,
    placed,
    run_starts,
    widened,
)
from attention_variants.masks import Causal, Mask, Window
from attention_variants.registry import CONTRACT_KEYWORDS, Implementation
from attention_variants.tiled import scaled

try:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError:  # moved or removed in this jax version
    splash = None

LANES = 128  # splash's key tiles are multiples of the TPU's 128 lanes
# The kernels each library runs for us (tests swap in the libraries' XLA paths to check the
# arguments on CPU).
KERNELS = {"cudnn": "cudnn", "tokamax": ("mosaic", "triton")}


def _mask(kernels, q, k, call):
    """The call's mask, sized for its shapes."""
    options = {n: x for n, x in call.items() if n not in CONTRACT_KEYWORDS}
    T, S = q.shape[1], k.shape[1]
    return kernels.mask(call.get("causal", True), **options).sized(T, S)


def _unplain(q, k, call) -> str | None:
    """What none of the fused kernels serves: their calls are self-attention over whole rows."""
    if call.get("return_lse"):
        return "return_lse"
    return beyond_self_attention(q, k, call)


def _per_device(kernel, *args):
    """kernel(*args) ([B, ...] arrays or None), per device under a current mesh of several:
    in a shard_map over the mesh axes that split the batch, replicated over the others."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return kernel(*args)
    spec = PartitionSpec(batch_axes(args[0].shape[0]))
    sharded = jax.shard_map(kernel, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)
    return sharded(*(None if x is None else placed(x, spec) for x in args))


def _band_of(m: Mask) -> tuple[bool, tuple[int, int] | None] | None:
    """(is_causal, window) of the libraries' flags for a causal, full or window mask."""
    if type(m) is Causal:
        return True, None
    if type(m) is Mask:
        return False, None
    if type(m) is Window:
        return m.right == 0, (m.left, m.right)
    return None


# --- splash --------------------------------------------------------------------------------


class _Pattern(getattr(splash, "Mask", object)):
    """A variant's mask as a splash mask: an empty or full block from the mask's tile answers,
    a partial one from its `visible` (positions of a row)."""

    def __init__(self, mask: Mask, shape: tuple[int, int]):
        self.mask, self._shape = mask, shape

    @property
    def shape(self):
        return self._shape

    def __getitem__(self, index):
        rows, cols = (np.arange(*s.indices(n)) for s, n in zip(index, self._shape, strict=True))
        shape = (len(rows), len(cols))
        if all(s.step in (None, 1) for s in index) and rows.size and cols.size:
            bounds = rows[0], rows[-1], cols[0], cols[-1]  # a tile: the mask's O(1) answers
            if not np.all(self.mask.tile_visible(*bounds)):
                return np.broadcast_to(False, shape)
            if np.all(self.mask.tile_full(*bounds)):
                return np.broadcast_to(True, shape)
        vis = self.mask.visible(rows[:, None], cols[None, :], self._shape[1])
        return np.broadcast_to(np.asarray(vis), shape)

    def __eq__(self, other):
        same = isinstance(other, _Pattern) and self._shape == other._shape
        return same and self.mask == other.mask

    def __hash__(self):
        return hash((self.mask, self._shape))


def splash_mask(m: Mask, T: int, S: int):
    """`m` as a splash mask over a [T, S] row."""
    band = _band_of(m)
    if band is None:
        return _Pattern(m, (T, S))
    is_causal, window = band
    if window is not None:
        return splash.LocalMask((T, S), window, offset=0)
    return splash.CausalMask((T, S)) if is_causal else splash.FullMask((T, S))


def _tile(n: int) -> int:
    return next(b for b in (512, 256, LANES) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(m: Mask, T: int, S: int, heads: int, mqa: bool, interpret: bool,
                   softcap: float | None = None):  # fmt: skip
    bq, bk = _tile(T), _tile(S)
    sizes = splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
    )  # fmt: skip
    masks = splash.MultiHeadMask([splash_mask(m, T, S)] * heads)
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    with jax.ensure_compile_time_eval():  # its block tables: constants, cached across traces
        kernel = make(masks, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                      attn_logits_soft_cap=softcap)  # fmt: skip
    return jax.tree.map(np.asarray, kernel)  # host arrays: no device or mesh placement


def splash_implementation(kernels) -> Implementation:
    def supports(q, k, v, **call):
        if splash is None:
            return "splash attention (not in this jax version)"
        missing = _unplain(q, k, call)
        if missing:
            return missing
        T = q.shape[1]
        if T % LANES:
            return f"T={T} (splash needs a multiple of {LANES})"
        m = _mask(kernels, q, k, call)
        i = np.arange(T)
        if not np.all(m.visible(i, i, T)):
            return "a mask that hides a query's own position (splash needs no empty rows)"
        if call.get("segment_ids") is not None and not m.shift_invariant:
            return (
                f"segment_ids with the {type(m).__name__} pattern (splash counts its positions "
                "from the row's start, the pattern from each document's)"
            )
        return None

    @contract
    def fn(q, k, v, call, options):
        m, lay = kernels.prepare(q, k, v, call, options)
        (T, N, H), (S, K) = q.shape[1:], k.shape[1:3]
        dtype, q = q.dtype, scaled(q, call["scale"])
        interpret = jax.default_backend() != "tpu"
        kernel = _splash_kernel(m, T, S, N // K if K < N else N, K < N, interpret,
                                options.get("softcap"))  # fmt: skip
        sinks = options.get("sink_logits")  # [N] float32: in the softmax's denominator
        sinks = None if sinks is None else sinks.astype(jnp.float32)

        def rows(q, k, v, q_seg, k_seg):  # [b, ...] rows of one device
            b = q.shape[0]
            ids = None if q_seg is None else splash.SegmentIds(q_seg, k_seg)
            k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [b, K, S, H]
            if K == N:
                run = jax.vmap(kernel, in_axes=(0, 0, 0, 0 if ids else None, None))
                return run(q.transpose(0, 2, 1, 3), k, v, ids, sinks).transpose(0, 2, 1, 3)
            q = q.reshape(b, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [b, K, G, T, H]
            grouped = None if sinks is None else sinks.reshape(K, N // K)  # per K/V head
            per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None, None if sinks is None else 0))
            out = jax.vmap(per_head, in_axes=(0, 0, 0, 0 if ids else None, None))(
                q, k, v, ids, grouped
            )
            return out.transpose(0, 3, 1, 2, 4).reshape(b, T, N, H)

        return _per_device(rows, q, k, v, lay.q_seg, lay.k_seg).astype(dtype)

    return Implementation(fn, supports=supports, auto=("tpu",),
                          modifiers=("softcap", "sink_logits"))  # fmt: skip


# The ring's steps call splash's backward kernels, which its public API does not export, with
# the ring's global lse: their names and the arguments this module passes them (by keyword).
_BACKWARD = {
    "_splash_attention_bwd_dkv": {"bkv_compute", "use_fused_bwd_kernel"},
    "_splash_attention_bwd_dq": set(),
}
_BACKWARD_ARGS = {
    "q", "k", "v", "segment_ids", "sinks", "logsumexp", "do", "di", "bq", "bkv", "is_mqa",
    "mask_info", "mask_value", "attn_logits_soft_cap", "q_layout", "k_layout", "v_layout",
    "mask_function", "interpret",
}  # fmt: skip


@functools.cache
def _splash_backward() -> dict | None:
    """splash's dK/dV and dQ kernels by name, if this jax version has them with the parameters
    this module passes (their signatures changed across versions), else None."""
    module = getattr(splash, "splash_attention_kernel", None)
    found = {name: getattr(module, name, None) for name in _BACKWARD}
    for name, fn in found.items():
        if fn is None or set(inspect.signature(fn).parameters) != _BACKWARD_ARGS | _BACKWARD[name]:
            return None
    return found


def splash_ring_unserved(T: int, chunks: int) -> str | None:
    """Why a ring's steps cannot run on splash (None: they can) for rows of T positions cut
    into `chunks` by the ring's layout."""
    if splash is None:
        return "splash attention (not in this jax version)"
    if _splash_backward() is None:
        return "splash's backward kernels (not with these parameters in this jax version)"
    if T % (chunks * LANES):
        return (f"T={T} (splash steps take chunks of a multiple of {LANES} positions: the layout "
                f"cuts the row into {chunks}, so T a multiple of {chunks * LANES})")  # fmt: skip
    return None


class SplashRingSteps:
    """A ring's steps (`ring.py`) on splash kernels: queries [B, K, G, L, H], keys and values
    [B, K, L, H]; each block runs the MQA kernel per (row, key/value head) with
    `save_residuals` (its lse). The backward of a step is splash's own dK/dV and dQ kernels,
    handed the ring's *global* lse and di = rowsum(out * d_out) - d_lse: splash's public VJP
    would use the block's own. A row that sees no key of a block (another document) gets
    splash's mask value (-0.7 x the float32 max) plus a log as its lse, and its output a mean of
    values: weighed exp(lse - total) = 0 in the merge, since every row sees its own position in
    its own block. Splash returns a step's output and gradients in the operands' dtype (the
    tiled engine's are float32): in bfloat16 each step's share is rounded before the float32
    sums. Tiles are splash's (512, 256 or 128 dividing the step), not block_q / block_k; a
    zigzag step's half slice is a copy here (positions are the second-minor axis)."""

    def __init__(self, ring):
        self.ring, (N, self.K) = ring, ring.heads
        self.G = N // self.K

    def queries(self, x):
        B, L, N, H = x.shape
        return x.reshape(B, L, self.K, self.G, H).transpose(0, 2, 3, 1, 4)

    def keys(self, x):
        return x.transpose(0, 2, 1, 3)

    def from_queries(self, x):
        B, K, G, L, H = x.shape
        return x.transpose(0, 3, 1, 2, 4).reshape(B, L, K * G, H)

    def from_keys(self, x):
        return x.transpose(0, 2, 1, 3)

    def _block(self, relation, q_seg, k_seg):
        """(rows, cols, kernel, (query ids, key ids)) of a step that is not skipped."""
        rows, cols, mask = self.ring.parts(relation)
        T, S = rows.stop - rows.start, cols.stop - cols.start
        interpret = jax.default_backend() != "tpu"
        ids = (None, None) if q_seg is None else (q_seg[:, rows], k_seg[:, cols])
        return rows, cols, _splash_kernel(mask, T, S, self.G, True, interpret), ids

    @staticmethod
    def _per_head(fn, q, k, v, ids, *rest):
        """fn(q [G, T, H], k, v [S, H], SegmentIds | None, *rest) over rows and key/value heads
        (ids: [B, T] and [B, S] or None; rest in the query layout)."""

        def head(q, k, v, q_seg, k_seg, *rest):
            return fn(q, k, v, None if q_seg is None else splash.SegmentIds(q_seg, k_seg), *rest)

        over_heads = jax.vmap(head, in_axes=(0, 0, 0, None, None) + (0,) * len(rest))
        return jax.vmap(over_heads)(q, k, v, *ids, *rest)

    def forward(self, relation, q, kv, q_seg):
        k, v, k_seg = kv
        rows, cols, kernel, ids = self._block(relation, q_seg, k_seg)
        with_lse = splash.splash_attention_kernel.SplashAttentionKernel(
            kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info,
            **{**kernel.kwargs, "save_residuals": True},
        )  # fmt: skip

        def attend(q, k, v, ids):
            out, (lse,) = with_lse(q, k, v, ids)
            return out, lse

        o, l = self._per_head(attend, q[..., rows, :], k[..., cols, :], v[..., cols, :], ids)
        L = q.shape[-2]
        return widened(o.astype(jnp.float32), rows, L, axis=-2), widened(l, rows, L, -jnp.inf, -1)

    def grads(self, relation, q, kv, q_seg, out, lse, d_out, d_lse):
        k, v, k_seg = kv
        rows, cols, kernel, ids = self._block(relation, q_seg, k_seg)
        sizes, kw, backward = kernel.kwargs["block_sizes"], kernel.kwargs, _splash_backward()
        common = dict(is_mqa=True, mask_value=kw["mask_value"], attn_logits_soft_cap=None,
                      q_layout=sizes.q_layout, k_layout=sizes.k_layout, v_layout=sizes.v_layout,
                      mask_function=kw["mask_function"], interpret=kw["interpret"])  # fmt: skip

        def grads(q, k, v, ids, lse, do, di):
            arrays = dict(q=q, k=k, v=v, segment_ids=ids, sinks=None, logsumexp=lse, do=do, di=di)
            _, dk, dv = backward["_splash_attention_bwd_dkv"](
                **arrays, bq=sizes.block_q_dkv, bkv=sizes.block_kv_dkv,
                bkv_compute=sizes.block_kv_dkv_compute, mask_info=kernel.dkv_mask_info,
                use_fused_bwd_kernel=False, **common,
            )  # fmt: skip
            dq = backward["_splash_attention_bwd_dq"](
                **arrays, bq=sizes.block_q_dq, bkv=sizes.block_kv_dq,
                mask_info=kernel.dq_mask_info, **common,
            )  # fmt: skip
            return dq, dk, dv

        o, do = out[..., rows, :], d_out[..., rows, :]
        lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # rows that see no key: p = 0
        di = jnp.einsum("...h,...h->...", o.astype(jnp.float32), do.astype(jnp.float32))
        di = di - d_lse[..., rows]  # d lse / d logits = p: the lse's cotangent joins di
        blocks = q[..., rows, :], k[..., cols, :], v[..., cols, :]
        gq, gk, gv = self._per_head(grads, *blocks, ids, lse[..., rows], do, di)
        spans = ((gq, rows, q), (gk, cols, k), (gv, cols, k))
        return tuple(widened(g.astype(jnp.float32), at, x.shape[-2], axis=-2) for g, at, x in spans)


# --- cuDNN and tokamax ---------------------------------------------------------------------


def _nvidia() -> str | None:
    """None on an NVIDIA GPU, else what is missing."""
    kind = jax.devices()[0].device_kind
    return None if "NVIDIA" in kind or jax.default_backend() != "gpu" else f"{kind} (not NVIDIA)"


def _fused(kernels, library: str, supports_more) -> Implementation:
    """A row that runs `library`'s fused kernel on the call's (causal, window) flags."""

    def supports(q, k, v, **call):
        missing = _unplain(q, k, call) or _nvidia()
        if missing:
            return missing
        m = _mask(kernels, q, k, call)
        if _band_of(m) is None:
            return f"the {type(m).__name__} pattern ({library} takes causal and window masks)"
        return supports_more(q, m, call.get("segment_ids") is not None)

    @contract
    def fn(q, k, v, call, options):
        is_causal, window = _band_of(_mask(kernels, q, k, {**call, **options}))
        kw = dict(scale=call["scale"], is_causal=is_causal, local_window_size=window)
        ids = call.get("segment_ids")
        if library == "cudnn":
            attention = jax.nn.dot_product_attention
            kw["implementation"] = KERNELS["cudnn"]
        elif ids is None:
            attention = _tokamax().dot_product_attention
            kw["implementation"] = KERNELS["tokamax"]
        else:
            attention = functools.partial(_tokamax_packed, **kw)
            return _per_device(attention, q, k, v, ids).astype(q.dtype)
        return _per_device(functools.partial(attention, **kw), q, k, v).astype(q.dtype)

    return Implementation(fn, ("gpu",), supports, measured=True)


def _tokamax():
    if not flags.FLAGS.is_parsed():  # tokamax reads its absl flags, parsing sys.argv if no
        flags.FLAGS.mark_as_parsed()  # app did: keep their defaults instead
    import tokamax

    return tokamax


def key_ranges(ids, is_causal: bool, window: tuple[int, int] | None):
    """[B, T] segment ids -> (k_start, k_end) [B, T] int32: the keys query i may see form the
    range [k_start, k_end) of its document (a contiguous run of ids), cut to the window
    (left, right) where there is one; k_end is None for causal calls (the flag cuts it)."""
    index = jnp.arange(ids.shape[1], dtype=jnp.int32)
    start = run_starts(ids)
    end = ids.shape[1] - jnp.flip(run_starts(jnp.flip(ids, 1)), 1)  # exclusive: the next run
    if window is not None:
        start = jnp.maximum(start, index - window[0])
        end = jnp.minimum(end, index + window[1] + 1)
    return start, None if is_causal else end


def _tokamax_packed(q, k, v, ids, *, scale, is_causal, local_window_size):
    """tokamax's attention over packed rows: its mask takes a key range per query (`k_start`,
    `k_end`), which its public function does not expose, so this builds the mask and tries its
    kernels in turn as that function does (tokamax's internal API: `supports` checks that it
    is there, so a tokamax without it falls back to the engine)."""
    api, base = _tokamax_internals()
    start, end = key_ranges(ids, is_causal, local_window_size)
    mask = base.Mask(
        k_start=start[:, None], k_end=None if end is None else end[:, None], is_causal=is_causal
    )
    scale, errors = base.AUTO if scale is None else scale, []
    for name in KERNELS["tokamax"]:
        if name == "mosaic" and name not in api.IMPLEMENTATIONS:  # 0.0.12 has one per platform
            name = "mosaic_gpu" if "NVIDIA" in jax.devices()[0].device_kind else "mosaic_tpu"
        if name not in api.IMPLEMENTATIONS:
            errors.append(NotImplementedError(f"tokamax's {name} kernel (not in this version)"))
            continue
        try:
            return api.IMPLEMENTATIONS[name](q, k, v, mask=mask, logits_scale=scale)
        except NotImplementedError as e:
            errors.append(e)
    raise ExceptionGroup("tokamax: no kernel served the packed call", errors)


def _hopper_or_later() -> bool:
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and float(capability) >= 9.0


def cudnn_implementation(kernels) -> Implementation:
    def supports_more(q, m, packed: bool):
        if packed:
            return "segment_ids (cudnn's public API has none)"
        if type(m) is Window and m.right:
            return (
                f"a window reaching {m.right} keys ahead (cuDNN's window without the causal flag "
                "attends to the future, jax PR #39576)"
            )
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"{q.dtype} inputs (cuDNN's flash kernel takes bfloat16 or float16)"
        H, most = q.shape[-1], 256 if _hopper_or_later() else 128
        if H % 8 or H > most:
            return f"head dim H={H} (cuDNN's flash kernel takes multiples of 8 up to {most} here)"
        return None

    return _fused(kernels, "cudnn", supports_more)


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def _tokamax_internals():
    """tokamax's internal attention modules (api, base) that packed rows use, or None where
    this tokamax lacks them."""
    _tokamax()
    try:
        from tokamax._src.ops.attention import api, base
    except ImportError:
        return None
    return (api, base) if hasattr(api, "IMPLEMENTATIONS") and hasattr(base, "Mask") else None


def tokamax_implementation(kernels) -> Implementation:
    def supports_more(q, m, packed: bool):
        if not _installed("tokamax"):
            return "tokamax (not installed: pip install '.[gpu]')"
        if packed and _tokamax_internals() is None:
            return "segment_ids (this tokamax lacks the internal mask API they use)"
        if packed and not (_hopper_or_later() and q.dtype in (jnp.bfloat16, jnp.float16)):
            return (
                f"segment_ids with {q.dtype} inputs before Hopper or in float32 (there tokamax "
                "runs Triton, whose backward builds a dense [B, T, S] mask from them)"
            )
        return None

    return _fused(kernels, "tokamax", supports_more)


def table(kernels) -> dict[str, Implementation]:
    """The accelerator rows, in "auto"'s order: before the portable engine."""
    return {
        "splash": splash_implementation(kernels),
        "cudnn": cudnn_implementation(kernels),
        "tokamax": tokamax_implementation(kernels),
    }
