"""`performer`: FAVOR+ positive orthogonal random features (Choromanski et al. 2021).

"Rethinking Attention with Performers": exp(x.y) = E_w[exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)]
for w ~ N(0, I), so positive random features phi(x)_j = exp(w_j.x - |x|^2/2) give an unbiased
softmax kernel estimate; rows of W drawn orthogonal in blocks of H lower its variance. Here
x = q scale^(1/2) and y = k scale^(1/2), so exp(q.k scale) is what is approximated. The same
`num_features` x H matrix serves every head; it is drawn from `seed` (numpy, deterministic).

Stabilisation: a query's features are divided by their max over features, a per-query constant
that cancels in the ratio. A key's features are divided by their own max exp(m_s), and the
engine (`chunked.py`) weighs key s by exp(m_s - M_t), M_t the running max over the keys that
query t sees, another per-query constant: causal outputs stay exactly causal, nothing overflows.
The constant 1/sqrt(num_features) cancels too and is left out.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_variants.common import check_positive, default_scale
from attention_variants.families import LinearState
from attention_variants.registry import register, spec

NUM_FEATURES = 256


@functools.lru_cache(maxsize=64)
def random_features(num_features: int, head_dim: int, seed: int) -> np.ndarray:
    """W [num_features, head_dim] float32: orthogonal blocks of H rows with chi(H) norms."""
    rng = np.random.default_rng(seed)
    blocks = [np.linalg.qr(rng.standard_normal((head_dim, head_dim)))[0].T]
    while len(blocks) * head_dim < num_features:
        blocks.append(np.linalg.qr(rng.standard_normal((head_dim, head_dim)))[0].T)
    w = np.concatenate(blocks)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=1)
    w = (w * norms[:, None]).astype(np.float32)
    w.flags.writeable = False  # shared through the cache
    return w


def features(q, k, scale, num_features: int, seed: int):
    """FAVOR+ features, float32: qf [B,T,N,F] <= 1, kf [B,S,K,F] <= 1, key log scales [B,S,K].

    The true key features are kf * exp(log_scale); the max subtracted from the query's
    exponents is dropped (it cancels).
    """
    w = jnp.asarray(random_features(num_features, q.shape[-1], seed))  # [F, H]
    root = math.sqrt(default_scale(scale, q.shape[-1]))
    x, y = q.astype(jnp.float32) * root, k.astype(jnp.float32) * root
    a = jnp.einsum("BTNH,FH->BTNF", x, w)
    qf = jnp.exp(a - lax.stop_gradient(a.max(-1, keepdims=True)))
    e = jnp.einsum("BSKH,FH->BSKF", y, w) - 0.5 * jnp.sum(y * y, -1, keepdims=True)
    log_scale = lax.stop_gradient(e.max(-1))
    return qf, jnp.exp(e - log_scale[..., None]), log_scale


def num_features(H: int, *, num_features=NUM_FEATURES, seed=0) -> int:
    """F, after checking the options (ValueError naming a bad one)."""
    check_positive(num_features=num_features)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    return num_features


def map_flops(B, T, S, N, H, *, num_features=NUM_FEATURES, **_) -> float:
    """The feature maps' projections: 2 (T + S) H F per head."""
    return 2.0 * B * N * (T + S) * H * num_features


@register(
    "performer",
    family=LinearState(num_features=num_features, map_flops=map_flops),
    long_context=True,
    test_options=({"chunk": 8, "num_features": 32, "seed": 1}, {"chunk": 13, "num_features": 20}),
)
def performer(q, k, *, scale=None, num_features=NUM_FEATURES, seed=0):
    """FAVOR+ features of q and k with `num_features` random features drawn from `seed`."""
    return features(q, k, scale, num_features, seed)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# the explicit sums over an explicit [T, S] mask, same random features.
reference = spec("performer").reference
