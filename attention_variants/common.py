"""The kernel contract at its boundary: input checks, packed documents, positions, references.

Every variant normalises its arguments through `layout(...)`, so the same ids mean the same
documents everywhere: a document is a contiguous run of equal ids along the sequence (ids are
turned into run ids, one cumulative sum), and mask patterns are laid on positions within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attention_variants.masks import Mask, check_int


def check_inputs(q, k, v) -> None:
    """Raises ValueError naming the dimensions when q, k, v break the contract's shapes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T|S, heads, H] (rank 4), got shape {x.shape}")
    B, T, N, H = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have equal shapes [B, S, K, H], got {k.shape} and {v.shape}"
        )
    Bk, S, K, Hk = k.shape
    if Bk != B:
        raise ValueError(f"batch B differs: q has B={B}, k/v have B={Bk}")
    if Hk != H:
        raise ValueError(f"head dim H differs: q has H={H}, k/v have H={Hk}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K}")


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_positive(**values) -> None:
    """Raises ValueError naming each option that is not a positive int."""
    for name, value in values.items():
        check_int(name, value)


class Layout(NamedTuple):
    """Where each query and key sits, after the contract's normalisation.

    q_pos [B|1, T], k_pos [B|1, S]: int32 positions on the mask's coordinates (absolute, or
    within the document for block patterns). q_abs [B|1, T]: absolute query positions
    (q_offset + i), for causal tile pruning. q_seg [B, T], k_seg [B, S]: document ids (equal
    ids: same document), or None. doc_len [B, T]: keys in the query's document, or None (the
    whole key row). q_offset: the offset when static (a Python int), None when traced.
    """

    q_pos: jax.Array
    k_pos: jax.Array
    q_abs: jax.Array
    q_seg: jax.Array | None
    k_seg: jax.Array | None
    doc_len: jax.Array | None
    q_offset: int | None
    within_document: bool = False

    @property
    def segmented(self) -> bool:
        return self.q_seg is not None


def _run_starts(ids):
    """[B, T] ids -> bool: where a new run of equal ids begins."""
    change = ids[:, 1:] != ids[:, :-1]
    return jnp.concatenate([jnp.ones_like(ids[:, :1], bool), change], 1)


def run_ids(ids):
    """[B, T] ids -> int32 run ids: a new id wherever the id changes (documents = runs)."""
    return jnp.cumsum(_run_starts(ids), axis=1, dtype=jnp.int32) - 1


def run_starts(ids):
    """[B, T] ids -> int32 index of the start of the run holding each position."""
    index = jnp.arange(ids.shape[1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(_run_starts(ids), index, 0), axis=1)


def key_documents(q_seg, k_seg):
    """For each query, the first key of its document and the document's key count (0: none).

    Documents are contiguous runs of one id among the keys, so a stable sort of the key ids and
    a binary search find them without comparing every query with every key.
    """
    order = jnp.argsort(k_seg, axis=1, stable=True)  # [B, S]
    ids = jnp.take_along_axis(k_seg, order, 1)
    search = jax.vmap(lambda ids, x, side: jnp.searchsorted(ids, x, side=side), (0, 0, None))
    lo, hi = search(ids, q_seg, "left"), search(ids, q_seg, "right")
    first = jnp.take_along_axis(order, jnp.clip(lo, 0, k_seg.shape[1] - 1), 1)
    return first.astype(jnp.int32), (hi - lo).astype(jnp.int32)


def offset_of(q_offset, B: int):
    """(static, [B]): q_offset as a Python int when it is one (None when traced or an array),
    and as int32 [B]. Raises ValueError naming q_offset when it is neither."""
    if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
        return int(q_offset), jnp.full((B,), int(q_offset), jnp.int32)
    bad = q_offset is None or isinstance(q_offset, (bool, float))
    q_offset = None if bad else jnp.asarray(q_offset)
    if bad or q_offset.shape not in ((), (B,)) or not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise ValueError(
            f"q_offset must be an int or an int array of shape () or [B] = ({B},), "
            f"got {q_offset if bad else (q_offset.dtype, q_offset.shape)}"
        )
    return None, jnp.broadcast_to(q_offset.astype(jnp.int32), (B,))


def beyond_self_attention(q, k, call) -> str | None:
    """What makes a call more than self-attention over whole rows, which the fused kernels,
    the ring and the linear family's causal sums serve (None: nothing): kv_segment_ids, a
    decoding offset, T != S. Raises ValueError for a malformed q_offset."""
    if call.get("kv_segment_ids") is not None:
        return "kv_segment_ids"
    static, _ = offset_of(call.get("q_offset", 0), q.shape[0])
    if static != 0:
        return "q_offset (decoding)"
    if q.shape[1] != k.shape[1]:
        return f"T={q.shape[1]} != S={k.shape[1]} (cross attention)"
    return None


def check_ids(name: str, ids, shape) -> None:
    if ids.shape != shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be int [B, length] = {shape}, got {ids.dtype} {ids.shape}")


def layout(
    q, k, *, segment_ids=None, kv_segment_ids=None, q_offset=0, within_document=False
) -> Layout:
    """Normalises the contract's position arguments (see README, "The kernel contract").

    Without kv_segment_ids the keys share the queries' ids (T == S): both become run ids, so a
    repeated id is a new document. With kv_segment_ids a query sees the keys of an equal id,
    and each id must be one run. Positions are absolute (queries at q_offset + i), or with
    `within_document` counted from the first key of the document (block patterns), with
    `doc_len`, the document's number of keys.
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    static, offset = offset_of(q_offset, B)
    i = jnp.arange(T, dtype=jnp.int32)
    q_abs = offset[:, None] + i if static is None else (static + i)[None]
    k_index = jnp.arange(S, dtype=jnp.int32)[None]
    if segment_ids is None:
        if kv_segment_ids is not None:
            raise ValueError("kv_segment_ids given without segment_ids (the queries' ids)")
        return Layout(q_abs, k_index, q_abs, None, None, None, static)
    check_ids("segment_ids", segment_ids, (B, T))
    if kv_segment_ids is None:
        if T != S:
            raise ValueError(f"kv_segment_ids [B, S] is needed when T != S, got T={T}, S={S}")
        q_seg = k_seg = run_ids(segment_ids)
    else:
        check_ids("kv_segment_ids", kv_segment_ids, (B, S))
        q_seg, k_seg = segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
        if not isinstance(q_seg, jax.core.Tracer) and not isinstance(k_seg, jax.core.Tracer):
            check_runs(np.asarray(q_seg), "segment_ids")
            check_runs(np.asarray(k_seg), "kv_segment_ids")
    if not within_document:
        return Layout(q_abs, k_index, q_abs, q_seg, k_seg, None, static)
    first, count = key_documents(q_seg, k_seg)
    q_pos = jnp.where(count > 0, q_abs - first, 0)  # a query with no key document sees nothing
    k_pos = k_index - run_starts(k_seg)
    return Layout(q_pos, k_pos, q_abs, q_seg, k_seg, count, static, within_document=True)


def check_runs(ids: np.ndarray, name: str) -> None:
    """Raises ValueError unless each id is one contiguous run per row (concrete ids only)."""
    for row in ids:
        if 1 + np.count_nonzero(row[1:] != row[:-1]) != len(np.unique(row)):
            raise ValueError(
                f"{name} must give each document one contiguous run of one id; got a row with a "
                f"repeated id: {row.tolist()[:32]}"
            )


def softmax_flops(B: int, N: int, H: int, pairs: float) -> float:
    """Useful forward FLOPs of softmax attention: QK^T and PV, 2 each per multiply-add."""
    return 4.0 * B * N * H * pairs


def visible(mask: Mask, lay: Layout):
    """Boolean [B|1, T, S]: the pairs `mask` shows under the layout (references only)."""
    doc_len = None if lay.doc_len is None else lay.doc_len[:, :, None]
    vis = mask.visible(lay.q_pos[:, :, None], lay.k_pos[:, None, :], doc_len)
    if lay.segmented:
        vis = vis & (lay.q_seg[:, :, None] == lay.k_seg[:, None, :])
    return vis


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes m_h (Press et al. 2022): the geometric sequence 2^(-8(h+1)/N) for N
    a power of two; otherwise the closest power of two's, then every other slope of twice it
    (their interpolation)."""

    def geometric(n):
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    closest = 1 << (num_heads.bit_length() - 1)
    if closest == num_heads:
        return geometric(num_heads)
    return np.concatenate([geometric(closest), geometric(2 * closest)[::2][: num_heads - closest]])


def alibi_bias(lay: Layout, num_heads: int):
    """ALiBi's bias -m_h |i - j| [B|1, N, T, S] float32 at the layout's positions (within a
    document they differ as absolute ones do)."""
    distance = jnp.abs(lay.q_pos[:, :, None] - lay.k_pos[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(alibi_slopes(num_heads), jnp.float32)[None, :, None, None] * distance[
        :, None]  # fmt: skip


def masked_scores(q, k, visible=None, scale=None, bias=None, softcap=None):
    """Float32 scaled scores [B, K, G, T, S] (G = N // K query heads per K/V head), plus `bias`
    [B|1, N, T, S], then soft-capped to c tanh(s / c) (`softcap` c); hidden pairs (visible:
    bool [B|1, T, S], True = visible) are -inf."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    s = s * default_scale(scale, H)
    if bias is not None:
        s = s + bias.reshape(bias.shape[0], K, N // K, *bias.shape[2:])
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if visible is not None:
        s = jnp.where(jnp.asarray(visible)[:, None, None], s, -jnp.inf)
    return s


def log_sum_exp(s):
    """[B, K, G, T, S] scores -> lse [B, T, N] float32, -inf on rows that see no key."""
    B, K, G, T, _ = s.shape
    m = jnp.max(s, axis=-1, keepdims=True)
    denom = jnp.sum(jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), axis=-1, keepdims=True)
    lse = jnp.where(denom[..., 0] > 0, (m + jnp.log(denom))[..., 0], -jnp.inf)  # [B, K, G, T]
    return lse.transpose(0, 3, 1, 2).reshape(B, T, K * G)


def softmax_or_zeros(s, axis: int = -1):
    """Softmax of scores `s` over `axis` whose rows of all -inf give zeros (nothing to see)."""
    m = jnp.max(s, axis=axis, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=axis, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


def softmax_attention(q, k, v, *, visible=None, scale=None, return_lse=False, bias=None,
                      softcap=None, sink_logits=None):  # fmt: skip
    """Plain softmax attention that materialises the [B, N, T, S] scores (the reference math).

    visible: optional bool [B|1, T, S] (True = visible). Rows that see no key return zeros and
    lse = -inf. Softmax statistics are float32; the output has q's dtype. bias, softcap: as
    `masked_scores`. sink_logits [N]: one more logit per head that has no value (gpt-oss's
    sinks): a column of scores whose probability is left out of the output.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    s = masked_scores(q, k, visible, scale, bias, softcap)
    if sink_logits is not None:
        sink = jnp.broadcast_to(sink_logits.astype(jnp.float32).reshape(1, K, N // K, 1, 1),
                                (B, K, N // K, T, 1))  # fmt: skip
        s = jnp.concatenate([s, sink], axis=-1)
    p = softmax_or_zeros(s)
    p = p if sink_logits is None else p[..., :-1]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(B, T, N, H).astype(q.dtype)
    return (out, log_sum_exp(s)) if return_lse else out


def contract(body: Callable) -> Callable:
    """A function with the contract's signature around body(q, k, v, call, options), where
    `call` holds the contract's keywords and `options` the variant's."""

    def fn(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, q_offset=0,
           scale=None, return_lse=False, **options):  # fmt: skip
        call = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                    q_offset=q_offset, scale=scale, return_lse=return_lse)  # fmt: skip
        return body(q, k, v, call, options)

    fn.__doc__ = body.__doc__
    return fn


def batch_axes(B: int, exclude: str | None = None) -> tuple[str, ...] | None:
    """The current mesh's axes (but `exclude`) that split a batch of B rows: the longest run of
    them, in mesh order, whose sizes divide B (the rest hold the whole batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    others = [a for a in mesh.axis_names if a != exclude and mesh.shape[a] > 1]
    while others and B % math.prod(mesh.shape[a] for a in others):
        others.pop()
    return tuple(others) or None


def placed(x, spec: jax.sharding.PartitionSpec):
    """x resharded to `spec` on a mesh of explicit axes (shard_map asks it; a no-op when x is
    already so); on automatic axes shard_map reshards by itself."""
    mesh = jax.sharding.get_abstract_mesh()
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    if all(types[a] == jax.sharding.AxisType.Explicit for a in jax.tree.leaves(tuple(spec))):
        return jax.reshard(x, spec)
    return x


def widened(x, span: slice, count: int, fill=0.0, axis: int = 0):
    """x (`span` of a longer axis `axis`) placed at `span` of an axis of `count`, padded with
    `fill` (a pad, not a scatter: XLA's CPU compiler crashed on a scatter that overwrites every
    row in a shard_map)."""
    if (span.start, span.stop) == (0, count):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (span.start, count - span.stop)
    return jnp.pad(x, pad, constant_values=fill)


def check_gates(name: str, q, gates: Mapping[str, Any], axes: Mapping[str, str]) -> None:
    """ValueError naming a gate whose shape is not its `axes` (letters of q's B, T, N, H; a
    digit: that size) or, when concrete, whose values leave its range (log_decay <= 0, the
    others in [0, 1])."""
    sizes = dict(zip("BTNH", q.shape, strict=True))
    for gate, x in gates.items():
        if x is None:
            continue
        shape = tuple(sizes[a] if a in sizes else int(a) for a in axes[gate])
        if getattr(x, "shape", None) != shape:
            raise ValueError(f"{name}: {gate} must be [{', '.join(axes[gate])}] = {shape}, "
                             f"got {getattr(x, 'shape', type(x).__name__)}")  # fmt: skip
        if isinstance(x, jax.core.Tracer):
            continue
        x = np.asarray(x, np.float32)
        low, high = (-np.inf, 0.0) if gate == "log_decay" else (0.0, 1.0)
        outside = ~((x >= low) & (x <= high))  # NaN too
        if outside.any():
            raise ValueError(f"{name}: {gate} must lie in [{low}, {high}], got {x[outside][0]}")
