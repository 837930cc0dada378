"""Measurement helpers: compile and time a jitted function, read its memory, time a GEMM.

Timing convention: compile excluded (timed apart), one warm-up call, then the median of
repeats with min and max, each call ended by `jax.block_until_ready`. Memory is XLA's compiled
memory analysis, plus the runtime peak of the warm-up call (see `PeakMemory`).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import psutil

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall time of the timed calls (the warm-up call excluded), in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's compiled memory analysis of one executable, in bytes."""

    temp: int
    arguments: int
    outputs: int
    alias: int

    @property
    def total(self) -> int:
        """Temp + arguments + outputs (aliased outputs counted once)."""
        return self.temp + self.arguments + self.outputs - self.alias

    @property
    def to_allocate(self) -> int:
        """What a call allocates beyond its arguments, which are already resident."""
        return self.temp + self.outputs - self.alias


def compile_timed(
    fn: Callable[..., Any], *args: Any, carry: int | None = None
) -> tuple[Any, float]:
    """`jax.jit(fn).lower(*args).compile()` and the seconds it took; `carry`: the argument
    `fn` returns as its second output, donated (see `chained`)."""
    start = time.perf_counter()
    donate = () if carry is None else (carry,)
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - start


def chained(compiled: Callable[..., Any], args: tuple[Any, ...], carry: int | None = None):
    """The call to time: `compiled(*args)`. With `carry`, `compiled` returns (out, the next
    args[carry]) and consumes the one it got (donated), so each call takes over the previous
    call's state as a loop does, and no call copies it (a cache of T tokens, say)."""
    if carry is None:
        return lambda: compiled(*args)
    args = list(args)

    def call():
        out, args[carry] = compiled(*args)
        return out

    return call


def compiled_memory(compiled: Any) -> Memory | None:
    """The compiled executable's memory analysis, or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    return Memory(
        int(m.temp_size_in_bytes),
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
    )


def free_memory_bytes(device: jax.Device) -> int | None:
    """Memory a new allocation can use: GPU/TPU allocator limit minus bytes in use; CPU the
    host's available memory (psutil; Linux's MemAvailable). None where unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    return int(psutil.virtual_memory().available)


def _status_bytes(field: str) -> int | None:
    """A `Name: <n> kB` field of /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_resident_peak() -> bool:
    """Resets the kernel's high-water mark of this process's resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _resident_peak() -> int | None:
    """The process's peak resident set: VmHWM, else getrusage's (lifetime) maximum."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


class PeakMemory:
    """Runtime peak memory of a block of code above what was in use when it started, in bytes
    (`peak_bytes`; None where unknown). Counted by the kernel or the allocator, not sampled.

    CPU: the process's peak resident set, reset at entry where Linux allows it
    (/proc/self/clear_refs); elsewhere the lifetime peak, known only when the block raised it.
    GPU/TPU: the allocator's `peak_bytes_in_use`, which cannot be reset: known only when the
    block raised it.
    """

    def __init__(self, device: jax.Device):
        self.device = device
        self.peak_bytes: int | None = None

    def _now_and_peak(self) -> tuple[int | None, int | None]:
        if self.device.platform == "cpu":
            return psutil.Process().memory_info().rss, _resident_peak()
        stats = self.device.memory_stats() or {}
        return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")

    def __enter__(self) -> PeakMemory:
        self._reset = self.device.platform == "cpu" and _reset_resident_peak()
        self._base, self._peak = self._now_and_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        _, peak = self._now_and_peak()
        if self._base is None or peak is None:
            return
        if self._reset or (self._peak is not None and peak > self._peak):
            self.peak_bytes = max(0, peak - self._base)


def choose_repeats(
    first_s: float, budget_s: float, min_repeats: int, max_repeats: int, long_call_s: float
) -> int:
    """Timed repeats after a warm-up call of `first_s`: as many as fit `budget_s`, at least
    `min_repeats` (1 once a call takes longer than `long_call_s`), at most `max_repeats`."""
    floor = 1 if first_s > long_call_s else min_repeats
    fit = int(budget_s / max(first_s, 1e-9))
    return max(floor, min(max_repeats, fit))


def time_calls(
    call: Callable[[], Any],
    *,
    budget_s: float,
    min_repeats: int,
    max_repeats: int,
    long_call_s: float,
    device: jax.Device | None = None,
) -> tuple[Timing, int | None]:
    """Times `call` (warm-up, then adaptive repeats); the runtime peak of the warm-up call."""
    sampler = PeakMemory(device or jax.devices()[0])
    with sampler:
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
    n = choose_repeats(first, budget_s, min_repeats, max_repeats, long_call_s)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    ms = [t * 1e3 for t in times]
    timing = Timing(statistics.median(ms), min(ms), max(ms), n)
    return timing, sampler.peak_bytes


def gemm_gflops(
    n: int, dtype: Any, budget_s: float = 1.0, device: jax.Device | None = None
) -> float:
    """Median GFLOP/s of an [n, n] @ [n, n] matmul (2 n^3 FLOPs) in `dtype`, timed here."""
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
    compiled, _ = compile_timed(lambda a, b: jnp.matmul(a, b, preferred_element_type=dtype), a, b)
    timing, _ = time_calls(
        lambda: compiled(a, b),
        budget_s=budget_s,
        min_repeats=5,
        max_repeats=50,
        long_call_s=math.inf,
        device=device,
    )
    return 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e9
