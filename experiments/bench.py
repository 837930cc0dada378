"""Measurement helpers: compile and time a jitted function, read its memory, time a GEMM.

Timing convention: compile excluded (timed apart), one warm-up call, then the median of
repeats with min and max, each call ended by `jax.block_until_ready`. Memory is XLA's compiled
memory analysis, plus a runtime peak sampled while the warm-up call runs (see `PeakSampler`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`jax.jit(fn).lower(*args).compile()` and the seconds it took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


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
    """Memory a new allocation can use: GPU/TPU allocator limit minus bytes in use; CPU
    /proc/meminfo MemAvailable. None where neither is known."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakSampler:
    """Runtime peak memory growth over a block of code, in bytes (None where unknown).

    GPU/TPU: the allocator's `bytes_in_use`, sampled, and `peak_bytes_in_use` when the block
    raised the process peak. CPU: the process resident set (/proc/self/statm) sampled every
    `interval_s`; a lower bound that can miss peaks shorter than the interval. Both exclude what
    was resident before the block (the inputs).
    """

    def __init__(self, device: jax.Device, interval_s: float = 0.001):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()

    def _read(self) -> int | None:
        if self.device.platform == "cpu":
            return _resident_bytes()
        return (self.device.memory_stats() or {}).get("bytes_in_use")

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self._read()
            if now is not None:
                self._max = max(self._max, now)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._base = self._read()
        self._max = self._base or 0
        stats = {} if self.device.platform == "cpu" else (self.device.memory_stats() or {})
        self._process_peak = stats.get("peak_bytes_in_use")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self._base is None:
            return
        now = self._read()
        self._max = max(self._max, now or 0)
        if self._process_peak is not None:
            peak = (self.device.memory_stats() or {}).get("peak_bytes_in_use", 0)
            if peak > self._process_peak:
                self._max = max(self._max, peak)
        self.peak_bytes = self._max - self._base


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
    sampler = PeakSampler(device or jax.devices()[0])
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
