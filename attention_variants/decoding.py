"""Decoding caches: what earlier tokens leave behind for the next, derived from the family.

A model that generates feeds its tokens back one at a time (or a prompt in chunks). Each call
appends t >= 1 tokens at `position` (the number of tokens already seen) and returns their
attention output; the cache carries what later tokens still need:

* **KV cache** (masked softmax): the keys and values of every position up to `max_len`. The new
  queries attend through the variant's own kernel with `q_offset=position` and its own mask,
  so decoding gives that variant's full forward, not dense causal attention's. Cached positions
  at or after `position + t` hold zeros, which the causal mask hides (a mask that shows later
  keys cannot decode: NotImplementedError). O(max_len) memory; writing past it raises
  ValueError when the position is concrete, and gives NaN outputs when it is traced. The
  position is traced in the model, so the kernel schedules every key tile of the cache: on CPU
  it skips the tiles outside the mask's band at run time, on accelerators it masks them (a step
  costs O(max_len) there, as a dense row does). A single token of a block pattern (`fixed`,
  `bigbird`) instead gathers the key tiles that the pattern's static schedule lists for its
  query tile and attends to those only (`scheduled_step`): O(keys of the schedule's widest
  row) per token, constant in max_len for BigBird. Chunks of several tokens run the kernel as
  above.
* **Block-selection KV cache** (`moba`): the KV cache plus each block's running key sum. A
  generated token gates every block from its sum and reads only the keys of its top_k blocks
  (O(max_len / block + top_k * block) per token); a chunk of tokens runs the prefill engine.
* **Window cache** (masked softmax whose causal mask shows, beyond a document's first
  `Mask.sinks` keys, only keys a bounded distance back: `Mask.band`, as `sliding_window`, with
  or without sinks): the first `sinks` keys and the last `behind`, in order. The new queries
  attend to [sinks, window, new keys] through the tiled engine with each slot's true position,
  so the mask's own predicate decides (empty slots, and sink slots still in the window, are
  masked as another document); then the window keeps its last `behind` keys and the sink slots
  take the new keys of the first positions. O(W + sinks) memory, however long the generation.
* **Recurrent state** (linear state): the running sums of the chunked engine (`chunked.State`),
  extended by its causal sums from that state. O(1) memory and time per token.

Keys and values are stored per K/V head (GQA: K, not N), in the model's dtype; the recurrent
sums stay float32. A cache is a pytree of arrays, so it travels through `jit` and `scan`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_variants import chunked, registry, selection
from attention_variants.common import (
    Layout,
    alibi_bias,
    check_gates,
    check_inputs,
    default_scale,
    layout,
    softmax_attention,
)
from attention_variants.masks import GRID
from attention_variants.tiled import block_sizes, make_schedule, tiled_attention


class KeyValues(NamedTuple):
    """Cached keys and values [B, L, K, H]: every position (KV cache) or the last few (window)."""

    k: jax.Array
    v: jax.Array


@dataclasses.dataclass(frozen=True)
class Cache:
    """A variant's decoding cache. With the variant's options as keywords:

    kind(**options) -> "kv" | "window" | "recurrent".
    init(batch, max_len, kv_heads, head_dim, dtype, **options) -> an empty cache (pytree).
    extend(cache, q [B,t,N,H], k [B,t,K,H], v [B,t,K,H], position, *, scale=None, **options)
      -> (out [B,t,N,H], cache): the t tokens at positions position..position+t-1 attend
      causally to everything before them and to each other; `position` may be traced.
    """

    kind: Callable[..., str]
    init: Callable[..., Any]
    extend: Callable[..., tuple[jax.Array, Any]]


def _check_step(q, k, v) -> None:
    check_inputs(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"decoding appends as many keys as queries, got T={q.shape[1]}, "
                         f"S={k.shape[1]}")  # fmt: skip


def full_message(max_len: int, position: int, t: int) -> str:
    return (
        f"the KV cache holds max_len={max_len} tokens: {position} cached plus {t} new would "
        f"be {position + t}"
    )


def check_backward(name: str, mask: Any) -> None:
    """Raises NotImplementedError unless the causal mask hides every later key (a cache of
    earlier tokens could not serve a query that sees ahead)."""
    q, k = np.arange(GRID)[:, None], np.arange(GRID)[None, :]
    ahead = np.asarray(mask.visible(q, k)) & (k > q)
    if mask.reach[1] not in (0, None) or ahead.any():
        raise NotImplementedError(
            f"attention variant {name!r} cannot decode: its causal mask shows later keys "
            f"(reach {mask.reach}), which a cache of earlier tokens cannot serve"
        )


def serving(name: str, options: dict[str, Any], q, k, v, **call) -> dict[str, Any]:
    """`options` with an implementation that serves this decoding call: the one asked for, or
    "auto" where it cannot (the fused kernels take no decoding offsets or kv_segment_ids; a
    model whose training runs on one of them still decodes)."""
    implementation = options.get("implementation", "auto")
    if implementation == "auto":
        return options
    rest = {n: x for n, x in options.items() if n != "implementation"}
    try:
        registry.spec(name).choose(implementation, q, k, v, **call, **rest)
    except NotImplementedError as e:
        logging.info("%s: decoding runs on 'auto' (%s)", name, e)
        return {**options, "implementation": "auto"}
    return options


def masked_softmax_cache(name: str, mask: Callable[..., Any], prepare=None, tiles=None) -> Cache:
    """The KV or window cache of a masked-softmax variant (`mask(causal, **options)`). With the
    family's `prepare` (the call's sized mask and layout) and `tiles(**options)` (its engine's
    tile sizes), a one-token step of a block pattern reads only the key tiles its schedule
    lists for the token's query tile (`scheduled_step`)."""

    def kept(options) -> tuple[int, int] | None:
        """(sinks, behind): the first keys and the last ones that the causal mask can still
        show when that bounds the cache, else None."""
        m = mask(True, **options)
        check_backward(name, m)
        return None if m.band[0] is None else (m.sinks, m.band[0])

    def kind(**options) -> str:
        return "kv" if kept(options) is None else "window"

    def init(batch, max_len, kv_heads, head_dim, dtype=jnp.float32, **options) -> KeyValues:
        length = kept(options)
        length = max_len if length is None else sum(length)
        zeros = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
        return KeyValues(zeros, zeros)

    def extend(cache: KeyValues, q, k, v, position, *, scale=None, **options):
        _check_step(q, k, v)
        kernel = registry.spec(name).fn
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        if kind(**options) == "kv":
            t, length = q.shape[1], cache.k.shape[1]
            if not isinstance(position, jax.core.Tracer) and int(position) + t > length:
                raise ValueError(full_message(length, int(position), t))
            keys = lax.dynamic_update_slice_in_dim(cache.k, k, position, axis=1)
            values = lax.dynamic_update_slice_in_dim(cache.v, v, position, axis=1)
            call = dict(causal=True, q_offset=position, scale=scale)
            out = None
            if t == 1 and tiles is not None:
                plain = dict(segment_ids=None, kv_segment_ids=None, return_lse=False)
                m, lay = prepare(q, keys, values, {**call, **plain}, options)
                out = scheduled_step(m, lay, tiles(**options), q, keys, values, scale, options)
            if out is None:
                options = serving(name, options, q, keys, values, **call)
                out = kernel(q, keys, values, **call, **options)
            # Past max_len the write would land on earlier slots: NaN, never a wrong number.
            out = jnp.where(position + t > length, jnp.nan, out).astype(out.dtype)
            return out, KeyValues(keys, values)
        return window_step(mask(True, **options), kept(options), cache, q, k, v, position,
                           scale, options)  # fmt: skip

    return Cache(kind, init, extend)


def scheduled_step(m, lay: Layout, sizes, q, keys, values, scale, options):
    """One token (at `lay`'s query position, traced or not) through the KV cache keys, values
    [B, L, K, H]: the static tile schedule of `m` over L positions (as a prefill of the whole
    cache would run it) lists, for each query tile, the key tiles it may see; the token reads
    those of its own tile only, gathered from the cache, and attends under the mask per element
    (with the score modifiers). For the fixed pattern that is the own block and one summary
    tile per earlier block, for BigBird the global, window and random blocks. The gather is as
    wide as the widest row of the schedule (static shapes), so a token costs O(that row's keys)
    wherever it sits, instead of every cached key. None where that row holds more than half of
    the cache (the engine's path is as cheap then)."""
    B, L = keys.shape[:2]
    bq, bk = min(sizes.block_q, L), min(sizes.block_k, L)
    schedule = make_schedule(m, L, L, bq, bk, segmented=False)
    width = schedule.kv.shape[1]
    if 2 * width * bk > L:  # most of the cache anyway: the engine is as fast
        return None
    tile = lay.q_abs[:, 0] // bq  # [B|1]: the token's query tile
    row = jnp.asarray(schedule.kv, jnp.int32)[tile]  # [B|1, width]
    listed = jnp.arange(width) < jnp.asarray(schedule.count, jnp.int32)[tile][:, None]
    key_pos = (row[..., None] * bk + jnp.arange(bk)).reshape(row.shape[0], -1)  # [B|1, P]
    at = jnp.minimum(key_pos, L - 1)
    shown = (jnp.repeat(listed, bk, axis=1) & (key_pos < L))[:, None]  # [B|1, 1, P]
    shown = shown & m.visible(lay.q_pos[:, :, None], at[:, None, :])
    rows = jnp.broadcast_to(at, (B, at.shape[1]))
    picked = [jax.vmap(lambda x, i: x[i])(x, rows) for x in (keys, values)]  # [B, P, K, H]
    near = lay._replace(k_pos=at)
    bias = alibi_bias(near, q.shape[2]) if options.get("bias") == "alibi" else None
    return softmax_attention(q, *picked, visible=shown, scale=scale, bias=bias,
                             softcap=options.get("softcap"),
                             sink_logits=options.get("sink_logits"))  # fmt: skip


def window_step(m, kept: tuple[int, int], cache: KeyValues, q, k, v, position, scale, options):
    """The window cache's step (`masked_softmax_cache`): cache slots [sinks | window] hold
    positions [0, n) and [position - length, position); the t new keys follow."""
    (n, length), (B, t) = kept, q.shape[:2]
    i, j, w = (jnp.arange(x, dtype=jnp.int32) for x in (t, n, length))
    start = position - length  # the window's first position (empty slots before 0)
    k_pos = jnp.concatenate([j, start + w, position + i])
    filled = jnp.concatenate([j < start, start + w >= 0, i >= 0])  # a sink in the window: empty
    keys, values = (jnp.concatenate([c, x], axis=1) for c, x in ((cache.k, k), (cache.v, v)))
    lay = Layout(
        q_pos=(position + i)[None], k_pos=k_pos[None], q_abs=(n + length + i)[None],
        q_seg=jnp.ones((B, t), jnp.int32),
        k_seg=jnp.broadcast_to(filled.astype(jnp.int32), (B, n + length + t)),
        doc_len=None, q_offset=None, within_document=True,
    )  # fmt: skip
    tiles = block_sizes(m, True, options.get("block_q"), options.get("block_k"))
    modifiers = {n: options.get(n) for n in ("bias", "softcap", "sink_logits")}
    out = tiled_attention(q, keys, values, m, lay, scale=scale, block_sizes=tiles, **modifiers)
    new = j - position  # the new token at sink slot j, if any
    take = ((new >= 0) & (new < t))[None, :, None, None]

    def kept_slots(cached, x):
        sinks = jnp.where(take, jnp.take(x, jnp.clip(new, 0, t - 1), axis=1), cached[:, :n])
        return jnp.concatenate([sinks, jnp.concatenate([cached[:, n:], x], axis=1)[:, t:]], 1)

    return out, KeyValues(kept_slots(cache.k, k), kept_slots(cache.v, v))


class BlockKeyValues(NamedTuple):
    """A KV cache [B, L, K, H] with each block's key sum [B, ceil(L / block), K, H] float32, and
    for NSA's compressed branch each block's value sum (else [B, 0, K, H])."""

    k: jax.Array
    v: jax.Array
    sums: jax.Array
    value_sums: jax.Array


def selection_cache(name: str, declared: Callable[..., Any], arguments: dict[str, str]) -> Cache:
    """The KV cache of a block-selection variant: keys, values and each block's running key
    sum (and value sum, NSA), so a step scores the cached blocks from their sums and reads only
    the selected ones (and NSA's window). `arguments`: the call's gates and their axes."""

    def init(batch, max_len, kv_heads, head_dim, dtype=jnp.float32, **options):
        sel = declared(options)
        zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        blocks = -(-max_len // sel.block)
        sums = jnp.zeros((batch, blocks, kv_heads, head_dim))
        return BlockKeyValues(zeros, zeros, sums, sums[:, : blocks if sel.branches else 0])

    def extend(cache: BlockKeyValues, q, k, v, position, *, scale=None, **options):
        _check_step(q, k, v)
        sel, (B, t), length = declared(options), q.shape[:2], cache.k.shape[1]
        gates = {g: options.pop(g, None) for g in arguments}
        check_gates(name, q, gates, arguments)
        if not isinstance(position, jax.core.Tracer) and int(position) + t > length:
            raise ValueError(full_message(length, int(position), t))
        keys, values = (lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), position, axis=1)
                        for c, x in ((cache.k, k), (cache.v, v)))  # fmt: skip
        at = (position + jnp.arange(t)) // sel.block
        sums = cache.sums.at[:, at].add(k.astype(jnp.float32))
        value_sums = cache.value_sums
        if sel.branches:
            value_sums = value_sums.at[:, at].add(v.astype(jnp.float32))
        scale = default_scale(scale, q.shape[-1])
        if t == 1:  # a generated token: its top_k blocks gathered, O(top_k * block) keys
            out = selection.step_attention(q, keys, values, sums, position, sel, scale=scale,
                                           value_sums=value_sums, **gates)  # fmt: skip
        else:  # a chunk: the prefill engine over the cache (blocks wholly before are scored)
            blocks = jax.tree.map(lambda x: jnp.broadcast_to(x, (B, length)),
                                  selection.uniform_blocks(length, sel.block))  # fmt: skip
            lay = layout(q, keys, q_offset=position, within_document=True)
            out = selection.branched_attention(
                q, keys, values, sel, lay=lay, bl=blocks, means=sums / sel.block,
                value_means=value_sums / sel.block, scale=scale, chunk=options["chunk"], **gates,
            )  # fmt: skip
        out = jnp.where(position + t > length, jnp.nan, out).astype(out.dtype)
        return out, BlockKeyValues(keys, values, sums, value_sums)

    return Cache(lambda **options: "kv", init, extend)


def linear_state_cache(
    features: Callable[..., tuple], num_features: Callable[[int, dict], int]
) -> Cache:
    """The recurrent state of a linear-state variant: `features(q, k, scale, options)` gives
    (qf, kf, log_scale); `num_features(head_dim, options)` the feature count F."""

    def kind(**options) -> str:
        return "recurrent"

    def init(batch, max_len, kv_heads, head_dim, dtype=jnp.float32, **options) -> chunked.State:
        q = jnp.zeros((1, 1, 1, head_dim), jnp.float32)
        stabilised = features(q, q, None, options)[2] is not None
        F = num_features(head_dim, options)
        return chunked.init_state(batch, kv_heads, F, head_dim, stabilised=stabilised)

    def extend(state: chunked.State, q, k, v, position, *, scale=None, **options):
        _check_step(q, k, v)
        qf, kf, m = features(q, k, scale, options)
        m = None if m is None else lax.stop_gradient(m.astype(jnp.float32))
        acc, _, state = chunked.causal_sums(
            qf, kf, chunked.with_ones(v), log_scale=m, chunk=options["chunk"], state=state
        )
        return chunked.ratio(acc).astype(q.dtype), state

    return Cache(kind, init, extend)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A variant's cache with its options bound (`attention_variants.decoder(name, ...)`)."""

    name: str
    cache: Cache
    options: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.cache.kind(**self.options)

    @property
    def needs_max_len(self) -> bool:
        """Whether the cache holds at most `max_len` tokens (a KV cache); window and recurrent
        caches take any number."""
        return self.kind == "kv"

    def init(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
             num_heads: int | None = None):  # fmt: skip
        """An empty cache; `num_heads` (query heads N, default kv_heads) sizes a state kept
        per query head (the recurrent family's)."""
        kw = {} if num_heads is None else dict(num_heads=num_heads)
        return self.cache.init(batch, max_len, kv_heads, head_dim, dtype, **kw, **self.options)

    def extend(self, cache, q, k, v, position, *, scale=None, **gates):
        """Appends q, k, v [B, t, ., H] at `position`; `gates` are the variant's call
        arguments (`Spec.arguments`: log_decay, beta per new token; sink_logits [N])."""
        arguments = registry.spec(self.name).arguments
        unknown = sorted(set(gates) - set(arguments))
        if unknown:
            raise TypeError(f"{self.name}: unknown call argument(s) {', '.join(unknown)}; it "
                            f"takes: {', '.join(arguments) or 'none'}")  # fmt: skip
        return self.cache.extend(cache, q, k, v, position, scale=scale, **gates, **self.options)


def decoder(name: str, **options: Any) -> Decoder:
    """The decoding cache of variant `name` with `options` bound and validated.

    Raises NotImplementedError naming the variant when its family declares no cache, or when
    its causal mask shows later keys.
    """
    s = registry.spec(name)
    if s.decode is None:
        raise NotImplementedError(
            f"attention variant {name!r} cannot decode: its family ({s.family}) declares no "
            f"decoding cache; variants that can: "
            f"{', '.join(n for n in registry.names() if registry.spec(n).decode is not None)}"
        )
    decoder = Decoder(name, s.decode, s.options(**options))
    decoder.kind  # noqa: B018  (NotImplementedError now for a mask that shows later keys)
    return decoder


def cache_bytes(cache: Any) -> int:
    """Bytes held by a cache's arrays."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
