"""The variant registry: one decorator to join the tests, the sweep and the model.

Every kernel follows one contract (see README):
    fn(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H], *, causal=True, segment_ids=None, scale=None,
       **options) -> out [B,T,N,H]
Its options are its extra keyword-only parameters; `get` binds and validates them eagerly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

CONTRACT_KEYWORDS = ("causal", "segment_ids", "scale")

Kernel = Callable[..., Any]
FlopsFn = Callable[..., float]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Metadata of one registered variant."""

    name: str
    fn: Kernel  # the kernel, options unbound
    reference: Kernel  # same math written for clarity (plain einsum / recurrence), float32
    exact: bool  # softmax attention under its mask: must equal `dense` with that mask
    flops: FlopsFn  # useful forward matmul FLOPs: flops(B, T, S, N, H, causal=..., **options)
    defaults: Mapping[str, Any]  # accepted options and their default values
    check: Callable[..., None] | None  # check(**options) raises ValueError on a bad value
    linear_in_length: bool  # time and memory grow O(T) (joins the long-context sweeps)
    mask: Callable[..., Any] | None  # mask(causal=..., **options) -> masks.Mask it applies
    examples: tuple[Mapping[str, Any], ...]  # option sets the conformance suite also runs

    def options(self, **options: Any) -> dict[str, Any]:
        """Validates `options` and returns them merged over the defaults."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(
                f"attention variant {self.name!r} got unknown option(s) {', '.join(unknown)}; "
                f"accepted options: {accepted}"
            )
        merged = {**self.defaults, **options}
        if self.check is not None:
            self.check(**merged)
        return merged

    def bound_reference(self, **options: Any) -> Kernel:
        """The reference with the options that change the math bound (tile sizes dropped)."""
        params = inspect.signature(self.reference).parameters
        merged = self.options(**options)
        return functools.partial(self.reference, **{k: merged[k] for k in merged if k in params})


_REGISTRY: dict[str, Spec] = {}


def register(
    name: str,
    *,
    exact: bool,
    reference: Kernel,
    flops: FlopsFn,
    check: Callable[..., None] | None = None,
    linear_in_length: bool = False,
    mask: Callable[..., Any] | None = None,
    examples: tuple[Mapping[str, Any], ...] = (),
) -> Callable[[Kernel], Kernel]:
    """Registers an attention kernel under `name` (see the module docstring for the contract).

    exact: the kernel is softmax attention under `mask(causal=..., **options)` and must equal
      `dense` under that mask. reference: the same math written plainly, for the tests.
    flops: useful forward FLOPs, flops(B, T, S, N, H, causal=..., **options).
    check: check(**options) raises ValueError naming a bad option value (run by `get`).
    linear_in_length: time and memory are O(T); such variants join the long sweeps.
    examples: small option sets (tile sizes, say) under which the conformance suite runs the
      kernel too, so that tiling and chunking are exercised at test sizes.
    """

    def decorator(fn: Kernel) -> Kernel:
        if name in _REGISTRY:
            raise ValueError(f"attention variant {name!r} is already registered")
        params = inspect.signature(fn).parameters
        missing = [kw for kw in CONTRACT_KEYWORDS if kw not in params]
        if missing:
            raise TypeError(f"kernel {name!r} lacks the contract keyword(s) {missing}")
        defaults = {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in CONTRACT_KEYWORDS
        }
        _REGISTRY[name] = Spec(
            name,
            fn,
            reference,
            exact,
            flops,
            defaults,
            check,
            linear_in_length,
            mask,
            tuple(examples),
        )
        return fn

    return decorator


def names() -> tuple[str, ...]:
    """Sorted names of all registered variants."""
    return tuple(sorted(_REGISTRY))


def spec(name: str) -> Spec:
    """The registration of `name`; an unknown name raises ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention variant {name!r}; known variants: {', '.join(names())}"
        ) from None


def get(name: str, **options: Any) -> Kernel:
    """The kernel `name` with `options` bound, validated now rather than at call time."""
    s = spec(name)
    return functools.partial(s.fn, **s.options(**options))
