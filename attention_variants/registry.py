"""The variant registry: one declaration to join the tests, the sweeps and the model.

A variant declares *what it is* through its family (`families.py`): a masked softmax declares
its mask, a linear-state variant its feature map, and the family derives the kernel, the plain
reference, the FLOP count and the implementation table. Every kernel follows the contract
(README, "The kernel contract"):

    fn(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H], *, causal=True, segment_ids=None,
       kv_segment_ids=None, q_offset=0, scale=None, return_lse=False, **options)
       -> out [B,T,N,H]  (or (out, lse [B,T,N]) with return_lse)

Its options are keyword-only; `get` binds and validates them eagerly. `implementation` picks a
row of the variant's implementation table ("auto": the first that serves the backend and call).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax

CONTRACT_KEYWORDS = (
    "causal",
    "segment_ids",
    "kv_segment_ids",
    "q_offset",
    "scale",
    "return_lse",
)

Kernel = Callable[..., Any]
FlopsFn = Callable[..., float]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a variant: `fn` follows the contract with the options as keywords.

    backends: where "auto" may pick it ("cpu", "gpu", "tpu"). supports(q, k, v, **call) returns
    None when it can serve the call, or the name of what it cannot serve (a shape, a dtype, an
    argument); an explicit request it cannot serve raises NotImplementedError naming that.
    """

    fn: Kernel
    backends: tuple[str, ...] = ("cpu", "gpu", "tpu")
    supports: Callable[..., str | None] = lambda *args, **kwargs: None


@dataclasses.dataclass(frozen=True)
class Spec:
    """Metadata of one registered variant."""

    name: str
    family: str  # "masked_softmax" | "linear_state" | another family's name
    fn: Kernel  # the kernel, options unbound; dispatches over `implementations`
    reference: Kernel  # same math written for clarity (plain einsum / sums), float32
    exact: bool  # softmax attention under its mask: must equal `dense` with that mask
    flops: FlopsFn  # useful forward matmul FLOPs: flops(B, T, S, N, H, causal=..., **options)
    defaults: Mapping[str, Any]  # accepted options and their default values
    check: Callable[..., None] | None  # check(**options) raises ValueError on a bad value
    implementations: Mapping[str, Implementation]  # in "auto"'s order of preference
    mask: Callable[..., Any] | None = None  # masked softmax: mask(causal=..., **options)
    decode: Any = None  # the decoding cache (`decoding.Cache`), or None: cannot decode
    long_context: bool = False  # benchmark metadata: O(T) memory, joins the long sweeps
    test_options: tuple[Mapping[str, Any], ...] = ()  # option sets the test suite also runs

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
        implementation = merged["implementation"]
        if implementation != "auto" and implementation not in self.implementations:
            known = ", ".join(("auto", *self.implementations))
            raise ValueError(
                f"attention variant {self.name!r}: unknown implementation {implementation!r}; "
                f"known: {known}"
            )
        if self.check is not None:
            self.check(**merged)
        return merged

    def bound_reference(self, **options: Any) -> Kernel:
        """The reference with the options bound (it ignores those that do not change the math,
        such as tile sizes)."""
        merged = self.options(**options)
        merged.pop("implementation")
        return functools.partial(self.reference, **merged)

    def choose(self, implementation: str, q, k, v, **call: Any) -> tuple[str, Implementation]:
        """The implementation that runs this call: as asked, or under "auto" the first that
        serves the current backend and the call."""
        backend = jax.default_backend()
        if implementation != "auto":
            impl = self.implementations[implementation]
            missing = impl.supports(q, k, v, **call)
            if missing is None and backend not in impl.backends:
                missing = f"the {backend!r} backend (it runs on {', '.join(impl.backends)})"
            if missing is not None:
                raise NotImplementedError(
                    f"attention variant {self.name!r}: implementation {implementation!r} does not "
                    f"support {missing}"
                )
            return implementation, impl
        for name, impl in self.implementations.items():
            if backend in impl.backends and impl.supports(q, k, v, **call) is None:
                return name, impl
        reasons = {n: i.supports(q, k, v, **call) for n, i in self.implementations.items()}
        raise NotImplementedError(f"attention variant {self.name!r}: no implementation: {reasons}")


_REGISTRY: dict[str, Spec] = {}


def _dispatcher(name: str) -> Kernel:
    """The registered kernel: validates its options, picks an implementation and calls it."""

    def kernel(q, k, v, **kwargs):
        s = spec(name)
        call = {kw: kwargs.pop(kw) for kw in CONTRACT_KEYWORDS if kw in kwargs}
        options = s.options(**kwargs)
        _, impl = s.choose(options.pop("implementation"), q, k, v, **call, **options)
        return impl.fn(q, k, v, **call, **options)

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def register(
    name: str,
    *,
    family: Any,
    long_context: bool = False,
    test_options: tuple[Mapping[str, Any], ...] = (),
) -> Callable[[Callable], Callable]:
    """Registers the variant `name` from its family's declaration (see `families.py`).

    family: e.g. `MaskedSoftmax(...)`, whose decorated function declares the mask, or
      `LinearState(...)`, whose decorated function is the feature map.
    long_context: benchmark metadata, O(T) memory: the variant joins the long-context sweeps.
    test_options: small option sets (tile or chunk sizes, say) under which the test suite runs
      the kernel too, so that tiling and chunking are exercised at test sizes.
    """

    def decorator(declaration: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"attention variant {name!r} is already registered")
        parts = family.build(name, declaration)
        defaults = {**parts.pop("defaults"), "implementation": "auto"}
        _REGISTRY[name] = Spec(
            name=name,
            fn=_dispatcher(name),
            defaults=defaults,
            long_context=long_context,
            test_options=tuple(test_options),
            **parts,
        )
        return declaration

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
