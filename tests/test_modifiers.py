"""Score modifiers on every masked-softmax variant: ALiBi, soft-capping and learned sinks,
against a plain reference written here from the papers' definitions (forward and gradients,
GQA, packed rows), their decoding, and the errors that name them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
from attention_variants.common import alibi_slopes

F32 = dict(rtol=2e-5, atol=2e-5)
MASKED = [n for n in av.names() if av.spec(n).family == "masked_softmax" and n != "xla"]


def plain(q, k, v, visible, *, alibi=False, softcap=None, sinks=None):
    """softmax_j(s_ij) v_j per head, from the definitions: s = q.k / sqrt(H); ALiBi adds
    -m_h (i - j) with m_h = 2^(-8 (h + 1) / N) (N a power of two here); the soft cap maps s
    to c tanh(s / c); a sink adds exp(sink_h) to the denominator and nothing to the sum.
    visible [B, T, S] bool; q [B, T, N, H], k, v [B, S, K, H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    outs = []
    for h in range(N):
        kh, vh = k[:, :, h // (N // K)], v[:, :, h // (N // K)]  # the head's key/value head
        s = jnp.einsum("btd,bsd->bts", q[:, :, h], kh) / np.sqrt(H)
        if alibi:
            i, j = np.arange(T)[:, None], np.arange(k.shape[1])[None, :]
            s = s - 2.0 ** (-8.0 * (h + 1) / N) * np.abs(i - j)
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        e = jnp.where(visible, jnp.exp(s), 0.0)  # scores here are small: no max shift
        denom = e.sum(-1, keepdims=True) + (0.0 if sinks is None else jnp.exp(sinks[h]))
        outs.append(jnp.einsum("bts,bsd->btd", e / denom, vh))
    return jnp.stack(outs, axis=2)


def inputs(seed=0, B=2, T=21, N=4, K=2, H=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(x, (B, T, K, H)) for x in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (N,))


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    # N = 6: the 4 slopes of N = 4, then every other slope of N = 8 (2^-1, 2^-3)
    np.testing.assert_allclose(alibi_slopes(6), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 0.5, 2.0**-3])


@pytest.mark.parametrize("name", MASKED)
@pytest.mark.parametrize("modifiers", [dict(softcap=1.5), dict(bias="alibi", sinks=True)])
def test_modifiers_match_the_plain_definition(name, modifiers):
    spec = av.spec(name)
    options = dict(spec.test_options[0] if spec.test_options else {})
    sinks = modifiers.pop("sinks", False)
    q, k, v, sink_logits = inputs()
    T = q.shape[1]
    visible = jnp.asarray(spec.mask(True, **spec.options(**options)).sized(T, T).dense(T, T))
    kernel = av.get(name, **options, **modifiers)
    call = dict(sink_logits=sink_logits) if sinks else {}

    def loss(fn, q, k, v, s):
        out = fn(q, k, v, s)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ours = lambda q, k, v, s: kernel(q, k, v, **({"sink_logits": s} if sinks else {}))  # noqa: E731
    theirs = lambda q, k, v, s: plain(  # noqa: E731
        q, k, v, visible[None], alibi="bias" in modifiers, softcap=modifiers.get("softcap"),
        sinks=s if sinks else None)  # fmt: skip
    np.testing.assert_allclose(kernel(q, k, v, **call), theirs(q, k, v, sink_logits), **F32)
    grads = [jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3))(q, k, v, sink_logits)
             for fn in (ours, theirs)]  # fmt: skip
    for a, b, what in zip(*grads, ("dq", "dk", "dv", "d sink_logits"), strict=True):
        if what == "d sink_logits" and not sinks:
            continue
        np.testing.assert_allclose(a, b, **F32, err_msg=what)


def test_modifiers_in_packed_rows_equal_each_document_alone():
    q, k, v, sinks = inputs(1, B=1, T=24)
    ids = jnp.asarray([[0] * 9 + [1] * 15])
    fn = av.get("sliding_window", window=6, sinks=2, block_q=8, block_k=8, bias="alibi",
                softcap=3.0)  # fmt: skip
    packed = fn(q, k, v, segment_ids=ids, sink_logits=sinks)
    for lo, hi in ((0, 9), (9, 24)):
        alone = fn(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], sink_logits=sinks)
        np.testing.assert_allclose(packed[:, lo:hi], alone, **F32)


def test_a_row_that_sees_no_key_but_a_sink_outputs_zero():
    q, k, v, sinks = inputs(2, B=1, T=8)
    ids = jnp.zeros((1, 8), jnp.int32)
    out, lse = av.get("blockwise", block_q=4, block_k=4)(
        q, k, v, segment_ids=ids, kv_segment_ids=ids + 1, sink_logits=sinks, return_lse=True
    )
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_allclose(lse, jnp.broadcast_to(sinks, lse.shape), **F32)  # log exp(sink)


@pytest.mark.parametrize(
    "options,call,error,needle",
    [({"bias": "rope"}, {}, ValueError, "bias must be one of"),
     ({"softcap": 0.0}, {}, ValueError, "softcap must be a number > 0"),
     ({"softcap": -1}, {}, ValueError, "softcap must be a number > 0"),
     ({}, {"sink_logits": jnp.zeros(3)}, ValueError, r"sink_logits must be a float array \[N\]"),
     ({"implementation": "xla", "softcap": 2.0}, {}, NotImplementedError, "softcap=2.0")],
)  # fmt: skip
def test_bad_modifiers_are_named(options, call, error, needle):
    q, k, v, _ = inputs(3, T=8)
    name = "xla" if options.get("implementation") == "xla" else "blockwise"
    with pytest.raises(error, match=needle):
        av.get(name, **options)(q, k, v, **call)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_serves_soft_capping_and_learned_sinks(kv_heads):
    """JAX's splash kernel (interpret mode here) with its own soft cap and sinks, forward and
    gradients, against the plain definition; ALiBi stays the engine's (splash has no bias)."""
    q, k, v, sinks = inputs(4, B=1, T=128, N=2, K=kv_heads, H=8)
    kernel = av.get("blockwise", implementation="splash", softcap=2.0)
    visible = jnp.tril(jnp.ones((1, 128, 128), bool))

    def loss(fn, q, k, v, s):
        out = fn(q, k, v, s)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ours = lambda q, k, v, s: kernel(q, k, v, sink_logits=s)  # noqa: E731
    theirs = lambda q, k, v, s: plain(q, k, v, visible, softcap=2.0, sinks=s)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v, sinks), theirs(q, k, v, sinks), **F32)
    grads = [jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3))(q, k, v, sinks)
             for fn in (ours, theirs)]  # fmt: skip
    for a, b, what in zip(*grads, ("dq", "dk", "dv", "d sink_logits"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=what)
    with pytest.raises(NotImplementedError, match="bias='alibi'"):
        av.get("blockwise", implementation="splash", bias="alibi")(q, k, v)
