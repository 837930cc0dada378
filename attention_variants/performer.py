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

from attention_variants.chunked import (
    Chunking,
    State,
    chunked_flops,
    init_state,
    linear_attention,
    linear_attention_reference,
    recurrent_step,
)
from attention_variants.common import check_inputs, check_positive, default_scale
from attention_variants.dense import causal_mask
from attention_variants.registry import register

DEFAULTS = Chunking()
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


def check(*, num_features, seed, chunk):
    check_positive(num_features=num_features)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got seed={seed!r}")
    Chunking(chunk)


def flops(B, T, S, N, H, *, causal=True, num_features=NUM_FEATURES, chunk=DEFAULTS.chunk, **_):
    """Feature maps (2 (T + S) H F per head) plus the chunked sums (see `chunked_flops`)."""
    maps = 2.0 * B * N * (T + S) * H * num_features
    return maps + chunked_flops(B, T, S, N, H, causal=causal, features=num_features, chunk=chunk)


def reference(
    q, k, v, *, causal=True, segment_ids=None, scale=None, num_features=NUM_FEATURES, seed=0
):
    """The explicit sums over the same features and an explicit [T, S] mask, float32."""
    check_inputs(q, k, v, segment_ids, causal)
    qf, kf, m = features(q, k, scale, num_features, seed)
    out = linear_attention_reference(qf, kf, v, causal=causal, segment_ids=segment_ids, log_scale=m)
    return out.astype(q.dtype)


@register(
    "performer",
    exact=False,
    reference=reference,
    flops=flops,
    check=check,
    linear_in_length=True,
    mask=causal_mask,
    examples=({"chunk": 8, "num_features": 32, "seed": 1}, {"chunk": 13, "num_features": 20}),
)
def performer(
    q,
    k,
    v,
    *,
    causal=True,
    segment_ids=None,
    scale=None,
    num_features=NUM_FEATURES,
    seed=0,
    chunk=DEFAULTS.chunk,
):
    """FAVOR+ attention with `num_features` random features; causal in chunks of `chunk`."""
    check_inputs(q, k, v, segment_ids, causal)
    check(num_features=num_features, seed=seed, chunk=chunk)
    qf, kf, m = features(q, k, scale, num_features, seed)
    out = linear_attention(
        qf, kf, v, causal=causal, segment_ids=segment_ids, log_scale=m, chunk=chunk
    )
    return out.astype(q.dtype)


def performer_init_state(batch: int, kv_heads: int, head_dim: int, num_features=NUM_FEATURES):
    """The empty decoding state: kv [B, K, F, H+1] and the running max [B, K], float32."""
    return init_state(batch, kv_heads, num_features, head_dim, stabilised=True)


def performer_step(state: State, q, k, v, *, scale=None, num_features=NUM_FEATURES, seed=0):
    """Decodes one token: q [B, N, H], k, v [B, K, H] -> (out [B, N, H], new state)."""
    qf, kf, m = features(q[:, None], k[:, None], scale, num_features, seed)
    out, state = recurrent_step(state, qf[:, 0], kf[:, 0], v, log_scale=m[:, 0])
    return out.astype(q.dtype), state
