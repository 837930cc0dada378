"""`deltanet` and `gated_deltanet`: linear attention whose state is written by the delta rule.

DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers";
chunked by Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"): with q, k L2-normalised per head,

    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}),   o_t = scale q_t S_t,

each write replaces what the state recalls for k_t by v_t, in proportion beta_t in [0, 1].
Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024) decays the state first:
S_t = exp(a_t) (S_{t-1} - beta_t k_t^T k_t S_{t-1}) + beta_t k_t^T v_t, a_t <= 0 per head and
token. `beta` and `log_decay` [B, T, N] are call arguments (None: beta = 1, no decay).
"""

from __future__ import annotations

import jax.numpy as jnp

from attention_variants.families import RecurrentState
from attention_variants.registry import Layer, register, spec

EPS = 1e-6  # as the papers' implementations: x / sqrt(sum x^2 + eps)


def l2_normalised(x):
    """x / |x| over the head dimension, float32."""
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS))


LAYER = Layer(conv=4, norm="rms", output_gate=True)  # short conv + SiLU, gated RMSNorm


@register(
    "deltanet",
    family=RecurrentState(gates=("beta",), delta=True),
    long_context=True,
    test_options=({"chunk": 8},),
    layer=LAYER,
)
def deltanet(q, k, *, beta=None):
    """q, k L2-normalised; the call's write strengths."""
    return l2_normalised(q), l2_normalised(k), None, beta


@register(
    "gated_deltanet",
    family=RecurrentState(gates=("log_decay", "beta"), delta=True),
    long_context=True,
    test_options=({"chunk": 8},),
    layer=LAYER,
)
def gated_deltanet(q, k, *, log_decay=None, beta=None):
    """q, k L2-normalised; the call's decays and write strengths."""
    return l2_normalised(q), l2_normalised(k), log_decay, beta


# The references beside the kernels: the token-by-token recurrences, compared with the kernels
# (output and gradients) by the conformance suite and tests/test_recurrent.py.
reference = spec("deltanet").reference
gated_reference = spec("gated_deltanet").reference
