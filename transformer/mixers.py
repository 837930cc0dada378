"""What a variant's paper puts around its kernel: short convolutions, gates, output norm and gate.

A variant declares its layer (`attention_variants.registry.Layer`) and its kernel's gates
(`Spec.arguments`, with their axes); the attention layer builds both from its input x [B, T, D]:

* beta [B, T, N] (a write strength): sigmoid(x W_beta), as DeltaNet and Gated DeltaNet.
* log_decay [B, T, N] (a decay per head and token): -exp(A_log) softplus(x W_a + dt_bias), the
  Mamba-2 / Gated DeltaNet parametrisation (A in [1, 16], dt in [1e-3, 1e-1] at init).
* log_decay [B, T, N, H] (per key feature): GLA's low-rank gate logsigmoid(x W_1 W_2 + b) / 16.
* branch_gates [B, T, N, 3] (NSA's gate per branch): sigmoid(x W_g + b), as the paper's gate
  MLP reduced to one layer.

Simplifications, named: Mamba-2's input scaling by dt (its B dt x) is left out, dt enters the
decay only; RetNet's xPos and every variant's positions are the model's (`positions`), the same
for every variant of an ablation; RetNet's group norm is a LayerNorm per head.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_variants.common import run_ids

LOW_RANK = 16  # GLA's gate rank
GLA_NORMALISER = 16.0  # GLA divides the log-sigmoid gate by 16 (slow forgetting at init)


class ShortConv(nn.Module):
    """Causal depthwise convolution of `width` taps over T, then SiLU, on x [B, T, ...].

    Packed rows: a tap that reaches into the previous document reads zero. Decoding keeps the
    last width - 1 inputs in the "cache" collection, so one token costs O(width)."""

    width: int
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x, segment_ids=None, decode=False):
        B, T = x.shape[:2]
        flat = x.reshape(B, T, -1)
        W = self.width
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0 / math.sqrt(W)), (W, flat.shape[-1]),
            self.param_dtype,
        )  # fmt: skip
        if decode:
            zeros = jnp.zeros((B, W - 1, flat.shape[-1]), flat.dtype)
            cache = self.variable("cache", "inputs", lambda: zeros)
            full = jnp.concatenate([cache.value, flat], axis=1)
            if not self.is_initializing():
                cache.value = full[:, T:]
        else:
            full = jnp.pad(flat, ((0, 0), (W - 1, 0), (0, 0)))
        seg = None
        if segment_ids is not None and not decode:
            runs = run_ids(segment_ids)  # documents are runs: [0 0 1 0] is three
            seg = jnp.pad(runs, ((0, 0), (W - 1, 0)), constant_values=-1)
        out = 0.0
        for j in range(W):  # tap j reads the input W - 1 - j tokens back
            tap = full[:, j : j + T]
            if seg is not None:
                tap = jnp.where((seg[:, j : j + T] == runs)[..., None], tap, 0.0)
            out = out + tap * kernel[j].astype(self.dtype)
        return nn.silu(out).astype(self.dtype).reshape(x.shape)


def inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class Gates(nn.Module):
    """The kernel's gates from x [B, T, D], for the axes it declares ({"beta": "BTN", ...})."""

    axes: tuple[tuple[str, str], ...]
    num_heads: int
    head_dim: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        N, H = self.num_heads, self.head_dim
        x = x.astype(jnp.float32)
        dense = lambda features, name, **kw: nn.Dense(  # noqa: E731
            features, param_dtype=self.param_dtype, name=name, **kw
        )
        gates = {}
        for gate, axes in self.axes:
            if gate == "beta":
                gates[gate] = nn.sigmoid(dense(N, "beta", use_bias=False)(x))
            elif gate == "branch_gates":
                logits = dense(N * 3, "branch_gates")(x).reshape(*x.shape[:2], N, 3)
                gates[gate] = nn.sigmoid(logits)
            elif axes == "BTN":  # -exp(A_log) softplus(x W + dt_bias)
                a_log = self.param("A_log", a_log_init, (N,))
                dt_bias = self.param("dt_bias", dt_bias_init, (N,))
                dt = jax.nn.softplus(dense(N, "dt", use_bias=False)(x) + dt_bias)
                gates[gate] = -jnp.exp(a_log) * dt
            else:  # per key feature: GLA's low-rank log-sigmoid gate
                low = dense(LOW_RANK, "decay_low_rank", use_bias=False)(x)
                logits = dense(N * H, "decay")(low).reshape(*x.shape[:2], N, H)
                gates[gate] = jax.nn.log_sigmoid(logits) / GLA_NORMALISER
        return gates


def a_log_init(key, shape):
    """A = exp(A_log) uniform in [1, 16] (Mamba-2's initialisation)."""
    return jnp.log(jax.random.uniform(key, shape, minval=1.0, maxval=16.0))


def dt_bias_init(key, shape):
    """softplus(dt_bias) = dt, log-uniform in [1e-3, 1e-1] (Mamba-2's initialisation)."""
    dt = jnp.exp(jax.random.uniform(key, shape, minval=math.log(1e-3), maxval=math.log(1e-1)))
    return inverse_softplus(dt)


class OutputGate(nn.Module):
    """The kernel's output [B, T, N, H]: plus D * v (skip), a per-head norm, times SiLU(x W_g)."""

    norm: str | None
    gate: bool
    skip: bool
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, out, x, v):
        B, T, N, H = out.shape
        if self.skip:  # v [B, T, K, H] repeated to the query heads
            D = self.param("D", nn.initializers.ones, (N,), self.param_dtype)
            v = jnp.repeat(v, N // v.shape[2], axis=2)
            out = out + D[:, None].astype(out.dtype) * v
        if self.norm is not None:
            norm = nn.RMSNorm if self.norm == "rms" else nn.LayerNorm
            out = norm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(out)
        if self.gate:
            g = nn.DenseGeneral((N, H), use_bias=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="gate")(x)  # fmt: skip
            out = out * nn.silu(g)
        return out
