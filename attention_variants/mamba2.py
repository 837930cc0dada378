"""`mamba2`: the state-space duality form of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs").

S_t = exp(a_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t: the SSD recurrence with a scalar
decay per head and token, `log_decay` a [B, T, N] <= 0 (the layer's dt * A), C = q, B = k,
x = v (the layer adds the D skip; Mamba-2's scaling of x by dt is left out there, see
transformer/mixers.py).
"""

from __future__ import annotations

from attention_variants.families import RecurrentState
from attention_variants.registry import Layer, register, spec

LAYER = Layer(conv=4, norm="rms", output_gate=True, skip=True)  # conv, D skip, gated norm


@register(
    "mamba2",
    family=RecurrentState(gates=("log_decay",)),
    long_context=True,
    test_options=({"chunk": 8},),
    layer=LAYER,
)
def mamba2(q, k, *, log_decay=None):
    """q, k as given; the call's decay per head and token."""
    return q, k, log_decay, None


# The reference beside the kernel: the token-by-token recurrence, compared with the kernel
# (output and gradients) by the conformance suite and tests/test_recurrent.py.
reference = spec("mamba2").reference
