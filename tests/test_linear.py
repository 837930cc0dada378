"""Family-specific properties of the linear-attention variants `linear` and `performer`.

The conformance suite covers the contract (and test_decode.py decoding); here: chunk-size
independence, the Performer's convergence to softmax, seeds, long bf16 inputs, bad options.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants import chunked
from attention_variants.common import softmax_attention
from attention_variants.performer import random_features

F32 = dict(rtol=1e-5, atol=1e-5)
SMALL = {"linear": {}, "performer": {"num_features": 32}}
DECODES = [n for n in av.names() if av.spec(n).family == "linear_state"]  # every such variant


@pytest.mark.parametrize("name", DECODES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_output_does_not_depend_on_chunk_size(name, causal, segmented):
    q, k, v = random_qkv(20, T=100, N=4, K=2)
    seg = packed_segments(21, 2, 100, max_segments=4) if segmented else None
    outs = [
        av.get(name, chunk=c, **SMALL.get(name, {}))(q, k, v, causal=causal, segment_ids=seg)
        for c in (1, 7, 32, 100, 256)
    ]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], **F32)


@pytest.mark.parametrize("causal", [True, False])
def test_performer_error_falls_with_num_features(causal):
    q, k, v = random_qkv(23, B=1, T=64, N=2, K=2, H=16)
    q, k = 0.5 * q, 0.5 * k  # mild logits, where the estimator converges quickly
    exact = softmax_attention(
        q, k, v, visible=np.tril(np.ones((1, 64, 64), bool)) if causal else None
    )

    def error(num_features):
        return np.mean(
            [
                float(jnp.sqrt(jnp.mean((fn(q, k, v, causal=causal) - exact) ** 2)))
                for fn in (av.get("performer", num_features=num_features, seed=s) for s in range(3))
            ]
        )

    errors = [error(m) for m in (16, 256, 1024)]  # about 0.08, 0.03, 0.016 when causal
    assert errors[0] > 1.5 * errors[1] and errors[1] > 1.4 * errors[2], errors
    assert errors[2] < 0.03, errors


def test_performer_is_deterministic_per_seed():
    q, k, v = random_qkv(24)
    run = lambda seed: av.get("performer", seed=seed, num_features=32)(q, k, v)  # noqa: E731
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.allclose(run(3), run(4))


def test_random_features_are_orthogonal_within_blocks():
    w = random_features(40, 16, 0)  # two blocks of 16 rows and one of 8
    assert w.shape == (40, 16)
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4)


def test_performer_is_stable_for_large_keys():
    """Key norms that would overflow unstabilised exp features (exponents ~ 1e3)."""
    q, k, v = random_qkv(25, T=40)
    k = 40.0 * k
    for causal in (True, False):
        out = av.get("performer", chunk=8, num_features=32)(q, k, v, causal=causal)
        ref = av.spec("performer").reference(q, k, v, causal=causal, num_features=32)
        assert bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_allclose(out, ref, **F32)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_long_bfloat16_stays_close_to_float32(name):
    """T=65536 in bf16: output and gradients near the same kernel's float32 run."""
    T = 65536
    q, k, v = random_qkv(26, B=1, T=T, N=1, K=1, H=16, dtype=jnp.bfloat16)
    fn = av.get(name, chunk=256, **SMALL[name])
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))  # noqa: E731
    run = jax.jit(lambda *x: (fn(*x), *jax.grad(loss, argnums=(0, 1, 2))(*x)))
    for low, high in zip(
        run(q, k, v), run(*(x.astype(jnp.float32) for x in (q, k, v))), strict=True
    ):
        low, high = low.astype(jnp.float32), np.asarray(high)
        scale = float(np.abs(high).max())
        np.testing.assert_allclose(low, high, rtol=0.05, atol=0.02 * scale)


@pytest.mark.parametrize(
    "name,option,value",
    [
        ("linear", "chunk", 0),
        ("linear", "chunk", -4),
        ("linear", "chunk", 2.5),
        ("performer", "chunk", 0),
        ("performer", "num_features", 0),
        ("performer", "num_features", -1),
        ("performer", "seed", "one"),
        ("performer", "seed", -1),
    ],
)
def test_bad_options_raise(name, option, value):
    with pytest.raises(ValueError, match=option):
        av.get(name, **{option: value})
    q, k, v = random_qkv(27)
    with pytest.raises(ValueError, match=option):
        av.spec(name).fn(q, k, v, **{option: value})


def test_decode_options_are_validated():
    with pytest.raises(TypeError, match="num_featurs"):
        av.decoder("performer", num_featurs=16)
    with pytest.raises(ValueError, match="num_features"):
        av.decoder("performer", num_features=0)


@pytest.mark.parametrize(
    "scaled,causal,segmented",
    [(False, True, False), (False, True, True), (True, False, True)],  # (True, False, True)
    # runs the causal sums with log scales and segments both ways
)
def test_accelerators_run_the_chunks_in_parallel(monkeypatch, scaled, causal, segmented):
    """On GPU and TPU the chunks are summed at once and joined by a prefix over their states
    (no scan over T / C chunks); checked here on CPU by taking that path: the program has no
    scan, and its outputs and gradients equal the CPU's scan (with performer's log scales too)."""
    q, k, v = random_qkv(24, T=45, N=4, K=2)
    qf, kf = jax.nn.softplus(q), jax.nn.softplus(k)
    log_scale = 3 * k[..., 0] if scaled else None
    seg = packed_segments(25, 2, 45, max_segments=4) if segmented else None
    kw = dict(causal=causal, segment_ids=seg, log_scale=log_scale, chunk=8)

    def run():  # a new function each time: make_jaxpr caches traces per function
        def loss(qf, kf, v):
            return jnp.sum(jnp.sin(chunked.linear_attention(qf, kf, v, **kw)))

        assert ("scan" in str(jax.make_jaxpr(loss)(qf, kf, v))) == (jax.default_backend() == "cpu")
        return jax.value_and_grad(loss, (0, 1, 2))(qf, kf, v)

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the scan, on any machine
    want = run()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for got, ref in zip(jax.tree.leaves(run()), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, **F32)
    # Groups of chunks in turn when all would not fit: 4 of the 6 chunks' here, padded to 8.
    monkeypatch.setattr(chunked, "WORKING_SET", 45_000)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(chunked.linear_attention(*a, **kw))), (0, 1, 2))
    for got, ref in zip(grads(qf, kf, v), want[1], strict=True):
        np.testing.assert_allclose(got, ref, **F32)
