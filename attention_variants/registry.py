"""The variant registry: one declaration to join the tests, the sweeps and the model.

A variant declares *what it is* through its family (`families.py`): a masked softmax declares
its mask, a linear-state variant its feature map, and the family derives the kernel, the plain
reference, the FLOP count and the implementation table. Every kernel follows the contract
(README, "The kernel contract"):

    fn(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H], *, causal=True, segment_ids=None,
       kv_segment_ids=None, q_offset=0, scale=None, return_lse=False, **options)
       -> out [B,T,N,H]  (or (out, lse [B,T,N]) with return_lse)

Its options are keyword-only; `get` binds and validates them eagerly. `implementation` picks a
row of the variant's implementation table ("auto": the first that serves the backend and call;
where several *measured* rows serve it, the fastest of them, timed once per call signature).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONTRACT_DEFAULTS = dict(
    causal=True, segment_ids=None, kv_segment_ids=None, q_offset=0, scale=None, return_lse=False
)
CONTRACT_KEYWORDS = tuple(CONTRACT_DEFAULTS)

Kernel = Callable[..., Any]
FlopsFn = Callable[..., float]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a variant: `fn` follows the contract with the options as keywords.

    backends: where it runs ("cpu", "gpu", "tpu"); an explicit request elsewhere raises.
    supports(q, k, v, **call) returns None when it can serve the call, or the name of what it
    cannot serve (a shape, a dtype, an argument); an explicit request it cannot serve raises
    NotImplementedError naming that. auto: where "auto" may pick it (None: its `backends`), e.g.
    a Pallas TPU kernel that runs elsewhere only in (slow) interpret mode. measured: "auto" times
    it against the other measured rows that serve the same call and keeps the fastest.
    modifiers: the masked-softmax score modifiers it serves ("softcap", "sink_logits", "bias";
    the family refuses calls with the others).
    """

    fn: Kernel
    backends: tuple[str, ...] = ("cpu", "gpu", "tpu")
    supports: Callable[..., str | None] = lambda *args, **kwargs: None
    auto: tuple[str, ...] | None = None
    measured: bool = False
    modifiers: tuple[str, ...] = ()

    def picked_on(self, backend: str) -> bool:
        return backend in (self.backends if self.auto is None else self.auto)


@dataclasses.dataclass(frozen=True)
class Layer:
    """What a variant's paper puts around its kernel in the attention layer (data only: the
    model builds it, `transformer/mixers.py`). The gates the kernel declares (`Spec.arguments`)
    are computed from the layer's input too.

    conv: width of a short causal depthwise convolution, then SiLU, on q, k and v (0: none).
    norm: a per-head norm of the kernel's output, "rms" or "layer" (None: none).
    output_gate: the normed output times SiLU(x W_g), per head, before the output projection.
    skip: plus D * v per head (Mamba-2's D skip).
    """

    conv: int = 0
    norm: str | None = None
    output_gate: bool = False
    skip: bool = False


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
    # call arguments beyond the contract's (per-call gates) and their axes, e.g. {"beta": "BTN"}
    arguments: Mapping[str, str] = dataclasses.field(default_factory=dict)
    causal_only: bool = False  # a causal=False call raises NotImplementedError
    # the query heads of a K/V head decide together (NSA's selection): GQA is then not
    # multi-head attention over the K/V heads repeated
    grouped: bool = False
    layer: Layer = Layer()  # what the model puts around the kernel (default: nothing)
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
        serves the current backend and the call (the fastest of the measured ones, if that
        first one is measured)."""
        backend = jax.default_backend()
        if implementation != "auto":
            impl = self.implementations[implementation]
            if backend not in impl.backends:
                missing = f"the {backend!r} backend (it runs on {', '.join(impl.backends)})"
            else:
                missing = impl.supports(q, k, v, **call)
            if missing is not None:
                raise NotImplementedError(
                    f"attention variant {self.name!r}: implementation {implementation!r} does not "
                    f"support {missing}"
                )
            return implementation, impl
        serving = {
            name: impl
            for name, impl in self.implementations.items()
            if impl.picked_on(backend) and impl.supports(q, k, v, **call) is None
        }
        if serving:
            name, impl = next(iter(serving.items()))
            rivals = {n: i for n, i in serving.items() if i.measured}
            if impl.measured and len(rivals) > 1:  # None: every rival failed to run
                unmeasured = [n for n, i in serving.items() if not i.measured]
                name = fastest(self.name, rivals, q, k, v, call) or next(iter(unmeasured), name)
            return name, serving[name]
        reasons = {n: i.supports(q, k, v, **call) for n, i in self.implementations.items()}
        raise NotImplementedError(f"attention variant {self.name!r}: no implementation: {reasons}")


_FASTEST: dict[tuple, str] = {}

# What a library's refusal of a call looks like: Python errors of argument checking, and the
# compiler's statuses for what it does not implement. Anything else (out of memory, INTERNAL,
# a bug) propagates from "auto"'s timing rather than quietly dropping a rival.
REFUSALS = (NotImplementedError, ValueError, TypeError)
REFUSED_STATUSES = ("UNIMPLEMENTED", "INVALID_ARGUMENT", "FAILED_PRECONDITION")


def cannot_serve(error: Exception) -> bool:
    """Whether an error of a rival's trial run means that it cannot serve the call."""
    if isinstance(error, REFUSALS):
        return True
    return isinstance(error, jax.errors.JaxRuntimeError) and str(error).startswith(REFUSED_STATUSES)


def agreed(choice: str | None, rivals) -> str | None:
    """Process 0's choice in a job of several processes (each process timed its own; one
    differing choice would compile different programs on different hosts), else `choice`."""
    if jax.process_count() == 1:
        return choice
    from jax.experimental import multihost_utils

    names = [None, *sorted(rivals)]
    index = multihost_utils.broadcast_one_to_all(np.int32(names.index(choice)))
    return names[int(index)]


def _signature(x: Any) -> Any:
    """What a timing depends on: arrays by shape and dtype, everything else by value."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return ("array", tuple(x.shape), str(x.dtype))
    return repr(x)


def fastest(variant: str, rivals: Mapping[str, Implementation], q, k, v, call) -> str | None:
    """The rival whose forward and backward run fastest on the current device for a call of
    this signature: timed once (median of 5 calls after a compiling one) on random stand-ins
    of the call's arrays (global shapes; under a current mesh the rivals shard them as in the
    call), then remembered for the process; every process of a multi-process job takes
    process 0's choice. Runs eagerly even under jit. A rival whose library refuses the call
    (`cannot_serve`) is left out, with a warning; None if all are. Any other error (out of
    memory, say) propagates. To skip the timing, pin the implementation (the variant's
    `implementation=` option, e.g. `--config.options.blockwise.implementation=cudnn`)."""
    key = (variant, tuple(rivals), *(_signature(x) for x in (q, k, v)))
    key += tuple((n, _signature(x)) for n, x in sorted({**CONTRACT_DEFAULTS, **call}.items()))
    if key in _FASTEST:
        return _FASTEST[key]
    seconds = {}
    with jax.ensure_compile_time_eval():
        keys = iter(jax.random.split(jax.random.key(0), 3 + len(call)))

        def stand_in(x):
            if not (hasattr(x, "shape") and hasattr(x, "dtype")):
                return x
            if jnp.issubdtype(x.dtype, jnp.floating):
                return jax.random.normal(next(keys), x.shape, x.dtype)
            return jnp.zeros(x.shape, x.dtype)  # ids: one document; offsets: 0

        args = [stand_in(x) for x in (q, k, v)]
        arrays = {n: stand_in(x) for n, x in call.items() if hasattr(x, "shape")}
        static = {n: x for n, x in call.items() if n not in arrays}
        for name, impl in rivals.items():

            def loss(q, k, v, arrays, fn=impl.fn):
                out = fn(q, k, v, **arrays, **static)
                out = out[0] if isinstance(out, tuple) else out  # (out, lse)
                return jnp.sum(out.astype(jnp.float32))

            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            try:
                jax.block_until_ready(step(*args, arrays))  # compiles
            except Exception as e:
                if not cannot_serve(e):
                    raise
                logging.warning("%s: %s refused, left out of auto's choice: %s", variant, name, e)
                continue
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(step(*args, arrays))
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times)
    _FASTEST[key] = agreed(min(seconds, key=seconds.get) if seconds else None, rivals)
    logging.info("%s: auto measured %s, picked %s", variant, seconds, _FASTEST[key])
    return _FASTEST[key]


_REGISTRY: dict[str, Spec] = {}


def _dispatcher(name: str) -> Kernel:
    """The registered kernel: validates its options, picks an implementation and calls it."""

    def kernel(q, k, v, **kwargs):
        s = spec(name)
        call = {kw: kwargs.pop(kw) for kw in (*CONTRACT_KEYWORDS, *s.arguments) if kw in kwargs}
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
    layer: Layer = Layer(),
) -> Callable[[Callable], Callable]:
    """Registers the variant `name` from its family's declaration (see `families.py`).

    family: e.g. `MaskedSoftmax(...)`, whose decorated function declares the mask, or
      `LinearState(...)`, whose decorated function is the feature map.
    long_context: benchmark metadata, O(T) memory: the variant joins the long-context sweeps.
    test_options: small option sets (tile or chunk sizes, say) under which the test suite runs
      the kernel too, so that tiling and chunking are exercised at test sizes.
    layer: what the paper puts around the kernel in the model's attention layer (`Layer`).
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
            layer=layer,
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
