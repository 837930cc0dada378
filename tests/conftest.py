"""Shared fixtures: random attention inputs (never zeros) in the contract's layout.

Tests marked `mesh` need 8 devices: `pytest -m mesh` (the second half of `make test`) selects
them, and this file then asks XLA for 8 simulated CPU devices before JAX starts its backend.
The default session (`-m "not mesh"`, setup.cfg) runs everything else on one device.
"""

import os

import jax
import jax.numpy as jnp
import pytest

import attention_variants as av

# The suite compares float32 kernels with float32 references to ~1e-5. On NVIDIA GPUs XLA runs
# float32 matmuls in TF32 by default (10-bit mantissa, ~3e-4 error at these shapes), which would
# hide real differences and fail the comparisons; ask for true float32 everywhere (a no-op on CPU).
jax.config.update("jax_default_matmul_precision", "highest")

MESH_DEVICES = 8


def pytest_configure(config):
    config.addinivalue_line("markers", f"mesh: needs {MESH_DEVICES} devices (pytest -m mesh)")
    selected = config.getoption("markexpr", "")
    if "mesh" in selected and "not mesh" not in selected:
        flag = f"--xla_force_host_platform_device_count={MESH_DEVICES}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def random_qkv(seed: int, B=2, T=37, S=None, N=4, K=2, H=16, dtype=jnp.float32):
    """q [B, T, N, H], k, v [B, S, K, H] from a fresh key; standard normal values."""
    S = T if S is None else S
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    return q, k, v


def packed_segments(seed: int, B: int, T: int, max_segments: int = 3):
    """int [B, T] ids of packed sequences: contiguous runs, increasing along T."""
    cuts = jax.random.randint(jax.random.key(seed), (B, T), 0, T) < max_segments - 1
    return jnp.cumsum(cuts.at[:, 0].set(False), axis=1).astype(jnp.int32)


@pytest.fixture
def qkv():
    return random_qkv(0)


def variant_cases():
    """pytest params: every registered variant with its default options and with each of its
    `test_options` (small tiles or chunks, so tiling is exercised at test sizes)."""
    return [
        pytest.param(name, opts, id=f"{name}-{i}")
        for name in av.names()
        for i, opts in enumerate(({}, *av.spec(name).test_options))
    ]


def small_cases():
    """pytest params: one small-tile option set per variant, for the costlier checks."""
    return [
        pytest.param(name, (av.spec(name).test_options or ({},))[0], id=name) for name in av.names()
    ]


def implementation_cases(T: int = 384):
    """pytest params (name, implementation, opts, dtype): every implementation of every variant
    that runs on this backend and serves length T, other than the one "auto" picks for the
    suite's other tests (float32, T=37: the portable engine, which they run), with the
    variant's first test option set and the first dtype it serves (float32, else bfloat16).
    On CPU: splash, in interpret mode; on TPU splash compiled, on GPU cuDNN and tokamax. A row
    of a variant whose mask equals an earlier variant's (ring's and blockwise's causal one)
    runs once: the accelerator rows are derived from the mask alone."""
    backend = jax.default_backend()
    probe = random_qkv(0, B=1, T=T, N=4, K=2)
    cases, seen = [], set()
    for name in av.names():
        spec = av.spec(name)
        opts = (spec.test_options or ({},))[0]
        options = {k: v for k, v in spec.options(**opts).items() if k != "implementation"}
        auto, _ = spec.choose("auto", *random_qkv(0, B=1, T=37, N=4, K=2), **options)
        mask = spec.mask(causal=True, **options).sized(T, T) if spec.mask else name
        for impl_name, impl in spec.implementations.items():
            if impl_name == auto or backend not in impl.backends or (impl_name, mask) in seen:
                continue  # an accelerator row of a mask already collected runs the same code
            seen.add((impl_name, mask))
            for dtype in (jnp.float32, jnp.bfloat16):
                q, k, v = (x.astype(dtype) for x in probe)
                if impl.supports(q, k, v, **options) is None:
                    case_id = f"{name}-{impl_name}-{jnp.dtype(dtype).name}"
                    cases.append(pytest.param(name, impl_name, opts, dtype, id=case_id))
                    break
    return cases
