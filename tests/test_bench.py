"""Measurement helpers: adaptive repeats, timing order statistics, memory analysis, GEMM."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench


@pytest.mark.parametrize(
    "first_s, expected",
    [
        (0.001, 10),  # cheap: as many as fit the budget, capped at max_repeats
        (0.5, 4),  # 2 s budget / 0.5 s
        (0.9, 3),  # fits only 2, but a cheap call gets min_repeats
        (5.0, 1),  # a long call gets a single timed repeat
    ],
)
def test_choose_repeats(first_s, expected):
    assert bench.choose_repeats(first_s, 2.0, 3, 10, 1.0) == expected


def test_time_calls_orders_statistics_and_counts_repeats():
    calls = []

    def call():
        calls.append(None)
        time.sleep(0.002 * len(calls))  # each call slower than the last
        return jnp.ones(())

    timing, _ = bench.time_calls(call, budget_s=0.05, min_repeats=3, max_repeats=5, long_call_s=1)
    assert len(calls) == timing.repeats + 1  # the warm-up call is not among the repeats
    assert 3 <= timing.repeats <= 5
    assert timing.min_ms <= timing.median_ms <= timing.max_ms
    assert timing.min_ms >= 4.0  # the fastest timed call was the second one (>= 4 ms)


def test_compiled_memory_counts_arguments_and_outputs():
    x = jnp.ones((1024, 256), jnp.float32)
    compiled, seconds = bench.compile_timed(lambda x: jnp.concatenate([x, x]) * 2.0, x)
    memory = bench.compiled_memory(compiled)
    assert seconds > 0
    assert memory.arguments == x.nbytes
    assert memory.outputs == 2 * x.nbytes
    assert memory.total == memory.temp + memory.arguments + memory.outputs - memory.alias
    assert memory.to_allocate == memory.total - memory.arguments


def test_a_chained_call_takes_over_the_state_of_the_one_before():
    """`carry`: the state is donated to each call and replaced by what it returns."""
    step = lambda x, state: (x * state.sum(), state + 1)  # noqa: E731
    compiled, _ = bench.compile_timed(step, jnp.float32(2), jnp.zeros(3), carry=1)
    call = bench.chained(compiled, (jnp.float32(2), jnp.zeros(3)), carry=1)
    assert [float(call()) for _ in range(3)] == [0.0, 6.0, 12.0]  # states 0, 1, 2
    plain, _ = bench.compile_timed(step, jnp.float32(2), jnp.ones(3))
    call = bench.chained(plain, (jnp.float32(2), jnp.ones(3)))  # no carry: the same inputs
    assert [float(call()[0]) for _ in range(2)] == [6.0, 6.0]


def test_free_memory_is_positive_on_this_device():
    device = jax.devices()[0]
    free = bench.free_memory_bytes(device)
    if device.platform == "cpu":  # /proc/meminfo's MemAvailable: at most the physical memory
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert isinstance(free, int) and 0 < free <= physical


def test_peak_memory_sees_a_short_allocation_then_resets():
    device = jax.devices()[0]
    if device.platform != "cpu" or not bench._reset_resident_peak():
        pytest.skip("the resettable resident-set peak is the Linux CPU path")
    with bench.PeakMemory(device) as first:
        big = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched, freed at once: no sleep needed
        del big
    assert first.peak_bytes is not None and first.peak_bytes >= 48 * 2**20
    with bench.PeakMemory(device) as second:  # the peak was reset: the 64 MiB do not count
        small = np.ones(2**20, np.uint8)
        del small
    assert second.peak_bytes is not None and second.peak_bytes < 16 * 2**20


def test_gemm_rate_is_plausible():
    rate = bench.gemm_gflops(128, jnp.float32, budget_s=0.05)
    assert 0.01 < rate < 1e6
