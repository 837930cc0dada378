"""`gla`: gated linear attention, a decay per key feature (Yang et al. 2023, "Gated Linear
Attention Transformers with Hardware-Efficient Training").

S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, with `log_decay` a [B, T, N, H]
<= 0 a call argument (the layer computes it from its input: a low-rank log-sigmoid gate).
Without it, no decay: causal linear attention without a feature map or normaliser.
"""

from __future__ import annotations

from attention_variants.families import RecurrentState
from attention_variants.registry import Layer, register, spec

LAYER = Layer(norm="rms", output_gate=True)  # the output norm and SiLU gate


@register(
    "gla",
    family=RecurrentState(gates=("log_decay",), per_feature=True),
    long_context=True,
    test_options=({"chunk": 8},),
    layer=LAYER,
)
def gla(q, k, *, log_decay=None):
    """q, k as given; the call's decays per key feature."""
    return q, k, log_decay, None


# The reference beside the kernel: the token-by-token recurrence, compared with the kernel
# (output and gradients) by the conformance suite and tests/test_recurrent.py.
reference = spec("gla").reference
