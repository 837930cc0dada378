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
  costs O(max_len) there, as a dense row does); `fixed` and `bigbird` prefill the causal band's
  tiles (their sparsity is lost there, not their result).
* **Window cache** (masked softmax whose causal mask reaches a bounded distance back and
  depends on k - q only, as `sliding_window`; a mask that declares `shift_invariant` is also
  checked to be so on a grid, else it gets a KV cache): the last `behind` keys, in order. The
  new queries attend through the kernel to [cache, new keys] (the slots before position 0 are
  masked as another document), then the cache keeps the last `behind` of them. O(W) memory,
  however long the generation.
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

from attention_variants import chunked, registry
from attention_variants.common import check_inputs
from attention_variants.masks import GRID, shifts_alike


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


def masked_softmax_cache(name: str, mask: Callable[..., Any]) -> Cache:
    """The KV or window cache of a masked-softmax variant (`mask(causal, **options)`)."""

    def behind(options) -> int | None:
        """How far back the causal mask reaches when that bounds the cache, else None."""
        m = mask(True, **options)
        check_backward(name, m)
        reach = m.reach[0]
        if reach is None or not m.shift_invariant:
            return None
        # a window cache sees its keys at other positions than the full row does
        return reach if shifts_alike(m, (1, 7, reach + 3)) else None

    def kind(**options) -> str:
        return "kv" if behind(options) is None else "window"

    def init(batch, max_len, kv_heads, head_dim, dtype=jnp.float32, **options) -> KeyValues:
        length = behind(options)
        length = max_len if length is None else length
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
            options = serving(name, options, q, keys, values, **call)
            out = kernel(q, keys, values, **call, **options)
            # Past max_len the write would land on earlier slots: NaN, never a wrong number.
            out = jnp.where(position + t > length, jnp.nan, out).astype(out.dtype)
            return out, KeyValues(keys, values)
        B, t = q.shape[:2]
        length = cache.k.shape[1]
        keys = jnp.concatenate([cache.k, k], axis=1)  # [B, length + t]: positions in order
        values = jnp.concatenate([cache.v, v], axis=1)
        # Slot j holds position `position - length + j`; those before 0 are empty: id 0.
        filled = jnp.arange(length + t) >= length - position
        kv_ids = jnp.broadcast_to(filled.astype(jnp.int32), (B, length + t))
        call = dict(causal=True, q_offset=length, scale=scale,
                    segment_ids=jnp.ones((B, t), jnp.int32), kv_segment_ids=kv_ids)  # fmt: skip
        out = kernel(q, keys, values, **call, **serving(name, options, q, keys, values, **call))
        return out, KeyValues(keys[:, t:], values[:, t:])

    return Cache(kind, init, extend)


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
        arguments (`Spec.arguments`: log_decay, beta), per new token."""
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
