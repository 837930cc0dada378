"""The conformance suite: every registered variant, under the same contract, no per-variant code.

Each variant runs with its default options and with each of its `examples` (small tiles or
chunks, so tiling is exercised at test sizes). Exact variants must also equal `dense` under the
mask they declare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants.common import softmax_attention

CASES = [
    pytest.param(name, opts, id=f"{name}-{i}")
    for name in av.names()
    for i, opts in enumerate(({}, *av.spec(name).examples))
]

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


def kernel(name, opts):
    return av.get(name, **opts)


def reference(name, opts):
    return av.spec(name).bound_reference(**opts)


def as_f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


def weighted_sum(fn, cotangent, **kw):
    """A scalar loss whose gradient is the VJP of `fn` with a random cotangent."""
    return lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shape_dtype_and_finite(name, opts, dtype):
    q, k, v = random_qkv(1, dtype=dtype)
    out = jax.jit(kernel(name, opts))(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


@pytest.mark.parametrize("name,opts", CASES)
def test_jit_does_not_retrace(name, opts):
    fn, traces = kernel(name, opts), []

    @jax.jit
    def run(q, k, v):
        traces.append(1)
        return fn(q, k, v)

    run(*random_qkv(2)).block_until_ready()
    run(*random_qkv(3)).block_until_ready()
    assert len(traces) == 1


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_forward_matches_reference(name, opts, causal, segmented):
    q, k, v = random_qkv(4, T=45, N=4, K=2)
    seg = packed_segments(5, 2, 45) if segmented else None
    out = kernel(name, opts)(q, k, v, causal=causal, segment_ids=seg)
    ref = reference(name, opts)(q, k, v, causal=causal, segment_ids=seg)
    np.testing.assert_allclose(out, ref, **F32)
    spec = av.spec(name)
    if spec.exact:  # also the plain softmax under the mask the variant declares
        mask = spec.mask(causal=causal, **spec.options(**opts)).dense(45, 45)
        dense = softmax_attention(q, k, v, mask=mask, segment_ids=seg)
        np.testing.assert_allclose(out, dense, **F32)


@pytest.mark.parametrize("name,opts", CASES)
def test_bfloat16_close_to_float32_reference(name, opts):
    q, k, v = random_qkv(6, T=40, dtype=jnp.bfloat16)
    out = kernel(name, opts)(q, k, v)
    ref = reference(name, opts)(*as_f32(q, k, v))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, **BF16)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_gradients_match_reference(name, opts, causal, segmented):
    q, k, v = random_qkv(7, T=33, N=4, K=2)
    seg = packed_segments(8, 2, 33) if segmented else None
    cot = jax.random.normal(jax.random.key(9), q.shape)
    kw = dict(causal=causal, segment_ids=seg)
    grads = jax.grad(weighted_sum(kernel(name, opts), cot, **kw), argnums=(0, 1, 2))(q, k, v)
    refs = jax.grad(weighted_sum(reference(name, opts), cot, **kw), argnums=(0, 1, 2))(q, k, v)
    for which, g, r in zip("qkv", grads, refs, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), f"d{which} not finite"
        np.testing.assert_allclose(g, r, **F32, err_msg=f"d{which}")


@pytest.mark.parametrize("name,opts", CASES)
def test_cross_attention_with_a_custom_scale(name, opts):
    """Non-causal, S != T, scale != 1/sqrt(H): forward and gradients vs the reference."""
    q, k, v = random_qkv(18, T=20, S=13, N=4, K=2)
    cot = jax.random.normal(jax.random.key(19), q.shape)
    kw = dict(causal=False, scale=0.3)
    out = kernel(name, opts)(q, k, v, **kw)
    np.testing.assert_allclose(out, reference(name, opts)(q, k, v, **kw), **F32)
    grads = jax.grad(weighted_sum(kernel(name, opts), cot, **kw), argnums=(0, 1, 2))(q, k, v)
    refs = jax.grad(weighted_sum(reference(name, opts), cot, **kw), argnums=(0, 1, 2))(q, k, v)
    for which, g, r in zip("qkv", grads, refs, strict=True):
        np.testing.assert_allclose(g, r, **F32, err_msg=f"d{which}")


@pytest.mark.parametrize("name,opts", CASES)
def test_causality(name, opts):
    q, k, v = random_qkv(10, T=50)
    fn = jax.jit(kernel(name, opts))
    out = fn(q, k, v)
    for t in (0, 17, 31, 48):
        k2 = k.at[:, t + 1 :].set(jax.random.normal(jax.random.key(t), k[:, t + 1 :].shape))
        v2 = v.at[:, t + 1 :].multiply(-3.0)
        out2 = fn(q, k2, v2)
        np.testing.assert_array_equal(out[:, : t + 1], out2[:, : t + 1], err_msg=f"t={t}")
        assert not np.array_equal(out[:, t + 1 :], out2[:, t + 1 :]), "future never mattered"


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_segment_isolation(name, opts, causal):
    q, k, v = random_qkv(11, B=1, T=48)
    seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 16)[None]  # three packed sequences of 16
    fn = jax.jit(lambda q, k, v: kernel(name, opts)(q, k, v, causal=causal, segment_ids=seg))
    out = fn(q, k, v)
    # Replacing the middle sequence's keys and values leaves the others' outputs untouched.
    k2 = k.at[:, 16:32].set(jax.random.normal(jax.random.key(12), k[:, 16:32].shape))
    v2 = v.at[:, 16:32].multiply(-2.0)
    out2 = fn(q, k2, v2)
    np.testing.assert_allclose(out[:, :16], out2[:, :16], **F32)
    np.testing.assert_allclose(out[:, 32:], out2[:, 32:], **F32)
    # Each sequence alone gives what it gets when packed.
    alone = kernel(name, opts)(q[:, 16:32], k[:, 16:32], v[:, 16:32], causal=causal)
    np.testing.assert_allclose(out[:, 16:32], alone, **F32)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_grouped_query_heads(name, opts, kv_heads):
    """GQA and MQA equal multi-head attention over K/V heads repeated to N."""
    q, k, v = random_qkv(13, T=29, N=6, K=kv_heads)
    fn = kernel(name, opts)
    repeat = lambda x: jnp.repeat(x, 6 // kv_heads, axis=2)  # noqa: E731
    np.testing.assert_allclose(fn(q, k, v), fn(q, repeat(k), repeat(v)), **F32)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("T", [1, 7, 63, 130])
def test_odd_lengths(name, opts, T):
    q, k, v = random_qkv(14, B=1, T=T, N=2, K=1)
    np.testing.assert_allclose(kernel(name, opts)(q, k, v), reference(name, opts)(q, k, v), **F32)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_overflow_on_large_logits(name, opts, dtype):
    """Scores of magnitude ~1e3 must not overflow the softmax, forward or backward."""
    q, k, v = random_qkv(15, T=40, dtype=dtype)
    q = (q.astype(jnp.float32) * 30.0).astype(dtype)
    cot = jax.random.normal(jax.random.key(16), q.shape)
    fn = kernel(name, opts)
    out = fn(q, k, v)
    grads = jax.grad(weighted_sum(fn, cot), argnums=(0, 1, 2))(q, k, v)
    for x in (out, *grads):
        assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))


@pytest.mark.parametrize("name", av.names())
def test_flops_are_positive_and_scale(name):
    spec = av.spec(name)
    small = spec.flops(1, 1024, 1024, 8, 64, causal=True, **spec.defaults)
    large = spec.flops(1, 4096, 4096, 8, 64, causal=True, **spec.defaults)
    assert 0 < small < large
    assert large <= 4 * 1 * 8 * 64 * 4096 * 4096, "more than full attention's FLOPs"


@pytest.mark.parametrize("name", av.names())
def test_bad_shapes_name_the_dimensions(name):
    fn = av.get(name)
    q, k, v = random_qkv(17, N=4, K=2)
    with pytest.raises(ValueError, match="N=4.*K=3"):
        fn(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="head dim H"):
        fn(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="rank 4"):
        fn(q[0], k, v)
    with pytest.raises(ValueError, match="segment_ids"):
        fn(q, k, v, segment_ids=jnp.zeros((2, 5), jnp.int32))
