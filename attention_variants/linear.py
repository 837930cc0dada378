"""`linear`: kernelised linear attention with phi(x) = elu(x) + 1.

Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention": out_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s), O(T) in time and
memory. The `LinearState` family derives the chunked causal kernel, the plain reference, and the
recurrent decoding state (`av.decoder("linear")`) from the feature map below.

`scale` is accepted for the contract and not used: the feature map is the paper's, on q and k
as given (elu(x) + 1 is not homogeneous, so a logit scale has no exact counterpart here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_variants.families import LinearState
from attention_variants.registry import register, spec


def elu_plus_one(x):
    """phi(x) = elu(x) + 1 > 0, in float32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@register(
    "linear",
    family=LinearState(num_features=lambda H: H),
    long_context=True,
    test_options=({"chunk": 8}, {"chunk": 13}),
)
def linear(q, k, *, scale=None):
    """Features phi(q) [B,T,N,H] and phi(k) [B,S,K,H]: F = H, no key log scales."""
    return elu_plus_one(q), elu_plus_one(k), None


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# the explicit sums over an explicit [T, S] mask, same features.
reference = spec("linear").reference
