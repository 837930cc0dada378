"""`retnet`: retention with fixed per-head decays (Sun et al. 2023, "Retentive Network").

S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, with gamma_h = 1 - 2^(-5-h) for query
head h (the paper's multi-scale decays: 0.96875 for the first head, approaching 1). Retention's
rotation of q and k (xPos) is the model's positions here, as for every other variant; its
group norm and output gate belong to the layer. The `RecurrentState` family derives the chunked
kernel, the token-by-token reference, FLOPs and the recurrent decoding state.
"""

from __future__ import annotations

import jax.numpy as jnp

from attention_variants.families import RecurrentState
from attention_variants.registry import Layer, register, spec


def log_decays(num_heads: int):
    """log(1 - 2^(-5-h)) for heads h = 0..N-1, float32 [N]."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


LAYER = Layer(norm="layer", output_gate=True)  # group norm (per head), SiLU gate


@register(
    "retnet",
    family=RecurrentState(),
    long_context=True,
    test_options=({"chunk": 8},),
    layer=LAYER,
)
def retnet(q, k):
    """q, k as given; the fixed decays of the query heads, no write gate."""
    B, T, N, _ = q.shape
    return q, k, jnp.broadcast_to(log_decays(N), (B, T, N)), None


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite: the token-by-token recurrence.
reference = spec("retnet").reference
