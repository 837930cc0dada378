"""The conformance suite: every registered variant, under the same contract, no per-variant code.

Each variant runs with its default options and with each of its `test_options` (small tiles or
chunks, so tiling is exercised at test sizes), against its reference in forward output and
gradients. Exact variants must also equal plain softmax under the mask they declare. Every other
implementation that runs on this backend (on CPU: splash, in interpret mode) runs the same
checks at lengths it serves (`implementation_cases`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import (
    implementation_cases,
    packed_segments,
    random_qkv,
    small_cases,
    variant_cases,
)

import attention_variants as av
from attention_variants.common import run_ids, softmax_attention

CASES = variant_cases()
SMALL = small_cases()
IMPLEMENTATIONS = implementation_cases()
EXACT = [p for p in SMALL if av.spec(p.values[0]).exact]
NOT_EXACT = [p for p in SMALL if not av.spec(p.values[0]).exact]

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


def kernel(name, opts):
    return av.get(name, **opts)


def reference(name, opts):
    """The reference, under one jit per call (eager, it dispatches op by op: slow here)."""
    ref = av.spec(name).bound_reference(**opts)
    return lambda q, k, v, **kw: jax.jit(lambda q, k, v: ref(q, k, v, **kw))(q, k, v)


def as_f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


def weighted_sum(fn, cotangent, **kw):
    """A scalar loss whose gradient is the VJP of `fn` with a random cotangent."""
    return lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * cotangent)


def grads(fn, q, k, v, seed=9, **kw):
    """Gradients under one jit (eager differentiation dispatches op by op: much slower here)."""
    cot = jax.random.normal(jax.random.key(seed), q.shape)
    return jax.jit(jax.grad(weighted_sum(fn, cot, **kw), argnums=(0, 1, 2)))(q, k, v)


def assert_bf16_grads_close(got, want):
    """bf16 gradients against float32 ones: error relative to their size."""
    for which, g, r in zip("qkv", got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g.astype(jnp.float32), r, rtol=0.05, atol=0.02 * scale,
                                   err_msg=f"d{which}")  # fmt: skip


def refuses_full_attention(name, opts, q, k, v, **kw) -> bool:
    """Whether the variant serves only causal calls (`Spec.causal_only`); if so, checks that
    a causal=False call raises NotImplementedError naming the variant and the argument."""
    if not av.spec(name).causal_only:
        return False
    with pytest.raises(NotImplementedError, match=f"{name}.*causal=False"):
        kernel(name, opts)(q, k, v, causal=False, **kw)
    return True


def assert_close_with_grads(name, opts, q, k, v, tol=F32, normwise=False, **kw):
    """Kernel and reference agree in output and gradients; `normwise`: the absolute tolerance
    is relative to each array's largest reference value (sums that grow with T, whose float32
    rounding, the token-by-token reference's included, grows with them)."""

    def close(got, want, err_msg=""):
        atol = tol["atol"] * max(1.0, float(jnp.max(jnp.abs(want)))) if normwise else tol["atol"]
        np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol, err_msg=err_msg)

    close(kernel(name, opts)(q, k, v, **kw), reference(name, opts)(q, k, v, **kw))
    got, want = (
        grads(kernel(name, opts), q, k, v, **kw),
        grads(reference(name, opts), q, k, v, **kw),
    )
    for which, g, r in zip("qkv", got, want, strict=True):
        close(g, r, err_msg=f"d{which}")


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segmented", [False, True])
def test_forward_and_gradients_match_reference(name, opts, causal, segmented):
    q, k, v = random_qkv(4, T=45, N=4, K=2)
    seg = packed_segments(5, 2, 45) if segmented else None
    if not causal and refuses_full_attention(name, opts, q, k, v, segment_ids=seg):
        return
    out = jax.jit(kernel(name, opts), static_argnames="causal")(
        q, k, v, causal=causal, segment_ids=seg
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference(name, opts)(q, k, v, causal=causal, segment_ids=seg)
    np.testing.assert_allclose(out, ref, **F32)
    spec = av.spec(name)
    if spec.exact and not segmented:  # also the plain softmax under the declared mask
        mask = spec.mask(causal=causal, **spec.options(**opts)).sized(45, 45).dense(45, 45)
        np.testing.assert_allclose(out, softmax_attention(q, k, v, visible=mask[None]), **F32)
    got = grads(kernel(name, opts), q, k, v, causal=causal, segment_ids=seg)
    want = grads(reference(name, opts), q, k, v, causal=causal, segment_ids=seg)
    for which, g, r in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, r, **F32, err_msg=f"d{which}")


@pytest.mark.parametrize("name,opts", SMALL)  # tiling in float32: the tests over CASES
def test_bfloat16_forward_and_gradients_close_to_float32_reference(name, opts):
    q, k, v = random_qkv(6, T=40, dtype=jnp.bfloat16)
    out = kernel(name, opts)(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = reference(name, opts)(*as_f32(q, k, v))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, **BF16)
    assert_bf16_grads_close(grads(kernel(name, opts), q, k, v),
                            grads(reference(name, opts), *as_f32(q, k, v)))  # fmt: skip


@pytest.mark.parametrize("name,opts", SMALL)
@pytest.mark.parametrize("T,S", [(20, 13), (13, 29)])
def test_cross_attention_with_a_custom_scale(name, opts, T, S):
    """Non-causal, S < T and S > T, scale != 1/sqrt(H): forward and gradients (variants that
    serve causal self-attention only: the custom scale there)."""
    q, k, v = random_qkv(18, T=T, S=S, N=4, K=2)
    if refuses_full_attention(name, opts, q, k, v, scale=0.3):
        q, k, v = random_qkv(18, T=T, N=4, K=2)
        assert_close_with_grads(name, opts, q, k, v, causal=True, scale=0.3)
        return
    assert_close_with_grads(name, opts, q, k, v, causal=False, scale=0.3)


@pytest.mark.parametrize("name", av.names())
def test_default_tiles_at_several_tiles(name):
    """The default options at a length that spans more than one default tile or chunk."""
    q, k, v = random_qkv(30, B=1, T=1100, N=2, K=1, H=16)
    unnormalised = av.spec(name).family == "recurrent_state"  # no decay by default: sums of T
    assert_close_with_grads(name, {}, q, k, v, tol=dict(rtol=2e-5, atol=2e-5),
                            normwise=unnormalised)  # fmt: skip


def assert_no_leak(fn, q, k, v, times):
    """Changing keys and values after t leaves outputs up to t bit-identical (and changes some
    output after t: the future was not simply ignored)."""
    fn = jax.jit(fn)
    out = fn(q, k, v)
    for t in times:
        k2 = k.at[:, t + 1 :].set(
            jax.random.normal(jax.random.key(t), k[:, t + 1 :].shape, k.dtype)
        )
        v2 = v.at[:, t + 1 :].multiply(-3.0)
        out2 = fn(q, k2, v2)
        np.testing.assert_array_equal(out[:, : t + 1], out2[:, : t + 1], err_msg=f"t={t}")
        assert not np.array_equal(out[:, t + 1 :], out2[:, t + 1 :]), "future never mattered"


@pytest.mark.parametrize("name,opts", CASES)
def test_causality(name, opts):
    assert_no_leak(kernel(name, opts), *random_qkv(10, T=50), times=(0, 17, 31, 48))


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_row_equals_each_document_alone(name, opts, causal):
    """Documents at unaligned offsets (lengths 11, 5, 23, 9): each equals itself run alone."""
    lengths = (11, 5, 23, 9)
    q, k, v = random_qkv(11, B=1, T=sum(lengths))
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32) * 7, jnp.array(lengths))[None]
    if not causal and refuses_full_attention(name, opts, q, k, v, segment_ids=seg):
        return
    fn = jax.jit(lambda q, k, v, s: kernel(name, opts)(q, k, v, causal=causal, segment_ids=s))
    out = fn(q, k, v, seg)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = kernel(name, opts)(q[:, part], k[:, part], v[:, part], causal=causal)
        np.testing.assert_allclose(out[:, part], alone, **F32, err_msg=f"document at {start}")
        start += n


@pytest.mark.parametrize("name,opts", SMALL)
def test_repeated_ids_are_new_documents_traced_or_not(name, opts):
    """A document is a run of equal ids: [0 0 1 1 0 0] is three documents, jit or not."""
    q, k, v = random_qkv(12, B=2, T=30)
    ids = jnp.array([[0] * 10 + [1] * 10 + [0] * 10, [3] * 5 + [4] * 20 + [3] * 5], jnp.int32)
    fn = kernel(name, opts)
    eager = fn(q, k, v, segment_ids=ids)
    traced = jax.jit(lambda s: fn(q, k, v, segment_ids=s))(ids)
    np.testing.assert_allclose(traced, eager, **F32)
    np.testing.assert_allclose(eager, fn(q, k, v, segment_ids=run_ids(ids)), **F32)
    three_rows = [jnp.array([[0] * 10 + [1] * 10 + [2] * 10, [0] * 5 + [1] * 20 + [2] * 5])]
    np.testing.assert_allclose(eager, reference(name, opts)(q, k, v, segment_ids=three_rows[0]),
                               **F32)  # fmt: skip


@pytest.mark.parametrize("name,opts", SMALL)
def test_segment_ids_under_vmap(name, opts):
    q, k, v = (x.reshape(2, 1, *x.shape[1:]) for x in random_qkv(13, B=2, T=24))
    seg = packed_segments(14, 2, 24)[:, None]  # [V=2, B=1, T]
    fn = kernel(name, opts)
    out = jax.vmap(lambda q, k, v, s: fn(q, k, v, segment_ids=s))(q, k, v, seg)
    for i in range(2):
        np.testing.assert_allclose(out[i], fn(q[i], k[i], v[i], segment_ids=seg[i]), **F32)


@pytest.mark.parametrize("name,opts", EXACT)
@pytest.mark.parametrize("segmented", [False, True])
def test_query_chunks_at_an_offset_equal_rows_of_the_full_output(name, opts, segmented):
    """Chunked prefill: q[:, a:b] with q_offset=a against all keys gives rows a:b."""
    q, k, v = random_qkv(15, T=40)
    seg = packed_segments(16, 2, 40) if segmented else None
    fn = kernel(name, opts)
    full = fn(q, k, v, segment_ids=seg)
    for a, b in ((0, 7), (7, 8), (13, 40), (21, 29)):
        kw = dict(kv_segment_ids=seg, segment_ids=None if seg is None else seg[:, a:b])
        chunk = fn(q[:, a:b], k, v, q_offset=a, **kw)
        np.testing.assert_allclose(chunk, full[:, a:b], **F32, err_msg=f"rows {a}:{b}")
        traced = jax.jit(lambda o: fn(q[:, a:b], k, v, q_offset=o, **kw))(jnp.int32(a))  # noqa: B023
        np.testing.assert_allclose(traced, full[:, a:b], **F32, err_msg=f"traced {a}:{b}")
    kw = dict(kv_segment_ids=seg, segment_ids=None if seg is None else seg[:, 5:9])
    per_row = fn(q[:, 5:9], k, v, q_offset=jnp.array([5, 5], jnp.int32), **kw)
    np.testing.assert_allclose(per_row, full[:, 5:9], **F32)


@pytest.mark.parametrize("name,opts", EXACT)
@pytest.mark.parametrize("segmented", [False, True])
def test_key_blocks_merged_by_lse_equal_the_whole(name, opts, segmented):
    """Ring attention's step: queries 16:32 against key blocks 0:16 and 16:32 (offsets 16 and
    0), merged by their log-sum-exps, give the full output. Needs masks of k - q only."""
    spec = av.spec(name)
    if not spec.mask(causal=True, **spec.options(**opts)).shift_invariant:
        pytest.skip("block patterns count a document from its first key in the call")
    q, k, v = random_qkv(24, T=32)
    seg = packed_segments(25, 2, 32) if segmented else None
    fn = kernel(name, opts)
    full = fn(q, k, v, segment_ids=seg)[:, 16:]
    parts = []
    for lo, offset in ((0, 16), (16, 0)):
        keys = slice(lo, lo + 16)
        ids = {} if seg is None else dict(segment_ids=seg[:, 16:], kv_segment_ids=seg[:, keys])
        parts.append(fn(q[:, 16:], k[:, keys], v[:, keys], q_offset=offset, return_lse=True, **ids))
    (a, lse_a), (b, lse_b) = parts
    lse = jnp.logaddexp(lse_a, lse_b)
    merged = a * jnp.exp(lse_a - lse)[..., None] + b * jnp.exp(lse_b - lse)[..., None]
    np.testing.assert_allclose(merged, full, **F32)


@pytest.mark.parametrize("name,opts", EXACT)
@pytest.mark.parametrize("causal", [True, False])
def test_log_sum_exp_against_float64(name, opts, causal):
    q, k, v = random_qkv(17, T=37, N=4, K=2)
    out, lse = kernel(name, opts)(q, k, v, causal=causal, return_lse=True)
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, kernel(name, opts)(q, k, v, causal=causal), **F32)
    spec = av.spec(name)
    mask = spec.mask(causal=causal, **spec.options(**opts)).sized(37, 37).dense(37, 37)
    qd, kd = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    s = np.einsum("btnh,bsnh->btns", qd, kd) / np.sqrt(16)
    s = np.where(mask[None, :, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    want = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,opts", EXACT)
def test_log_sum_exp_gradients_and_rows_that_see_nothing(name, opts):
    """lse is differentiable (ring attention merges with it); a row with no key gets -inf."""
    q, k, v = random_qkv(19, B=1, T=12, S=16)
    kw = dict(causal=True, segment_ids=jnp.array([[1] * 6 + [2] * 6], jnp.int32),
              kv_segment_ids=jnp.array([[1] * 10 + [3] * 6], jnp.int32))  # fmt: skip
    out, lse = kernel(name, opts)(q, k, v, return_lse=True, **kw)
    np.testing.assert_array_equal(out[:, 6:], 0.0)
    assert bool(jnp.all(lse[:, 6:] == -jnp.inf)) and bool(jnp.all(jnp.isfinite(lse[:, :6])))
    cot = jax.random.normal(jax.random.key(20), lse.shape)

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v, return_lse=True, **kw)
            return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * cot) + jnp.sum(out**2)

        return f

    got = jax.grad(loss(kernel(name, opts)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference(name, opts)), (0, 1, 2))(q, k, v)
    for which, g, r in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, r, **F32, err_msg=f"d{which}")


@pytest.mark.parametrize("name,opts", NOT_EXACT)
def test_linear_state_variants_name_what_they_cannot_serve(name, opts):
    q, k, v = random_qkv(21, T=16)
    fn = kernel(name, opts)
    seg = jnp.zeros((2, 16), jnp.int32)
    for kw, what in (
        (dict(return_lse=True), "return_lse"),
        (dict(q_offset=3), "q_offset"),
        (dict(segment_ids=seg, kv_segment_ids=seg), "kv_segment_ids"),
    ):
        with pytest.raises(NotImplementedError, match=f"{name}.*{what}"):
            fn(q, k, v, **kw)


@pytest.mark.parametrize("name,opts", SMALL)  # every tiling runs GQA in the first test
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads(name, opts, kv_heads):
    """GQA and MQA equal multi-head attention over K/V heads repeated to N (where the heads of
    a group decide together, `Spec.grouped`, the reference's GQA)."""
    q, k, v = random_qkv(13, T=29, N=6, K=kv_heads)
    fn = kernel(name, opts)
    repeat = lambda x: jnp.repeat(x, 6 // kv_heads, axis=2)  # noqa: E731
    want = reference(name, opts)(q, k, v) if av.spec(name).grouped else fn(q, repeat(k), repeat(v))
    np.testing.assert_allclose(fn(q, k, v), want, **F32)


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("T", [1, 63, 130])
def test_odd_lengths(name, opts, T):
    q, k, v = random_qkv(14, B=1, T=T, N=2, K=1)
    np.testing.assert_allclose(kernel(name, opts)(q, k, v), reference(name, opts)(q, k, v), **F32)


@pytest.mark.parametrize("name,opts", SMALL)
def test_large_logits_match_the_reference(name, opts):
    """Scores of magnitude ~1e3 must not overflow the softmax, forward or backward."""
    q, k, v = random_qkv(15, T=40)
    assert_close_with_grads(name, opts, 30.0 * q, k, v, tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("name", av.names())
def test_flops_are_positive_and_scale(name):
    spec = av.spec(name)
    small = spec.flops(1, 1024, 1024, 8, 64, causal=True)
    large = spec.flops(1, 4096, 4096, 8, 64, causal=True)
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
    with pytest.raises(ValueError, match="q_offset"):
        fn(q, k, v, q_offset=jnp.zeros((3,), jnp.int32))


class SegmentIdsWithAndWithoutJit(parameterized.TestCase):
    """chex variants: the same ids give the same answer traced or not, in every variant."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(n, n) for n in av.names()])
    def test_same_ids_same_answer(self, name):
        q, k, v = random_qkv(22, T=26)
        ids = packed_segments(23, 2, 26, max_segments=4)
        fn = self.variant(lambda q, k, v, s: av.get(name)(q, k, v, segment_ids=s))
        ref = av.spec(name).bound_reference()(q, k, v, segment_ids=ids)
        np.testing.assert_allclose(fn(q, k, v, ids), ref, **F32)


# --- every other implementation that runs here (on CPU: splash, interpret mode) -----------------


@pytest.mark.parametrize("name,implementation,opts,dtype", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "causal,segmented,kv_heads",
    [(True, False, 2), (False, False, 4), (True, True, 1), (False, True, 2)],
    ids=["causal-gqa", "full-mha", "causal-packed-mqa", "full-packed-gqa"],
)
def test_each_implementation_matches_the_reference(
    name, implementation, opts, dtype, causal, segmented, kv_heads
):
    """Forward and gradients against the float32 reference at T=384 (splash: 3 x 3 tiles); the
    one call an implementation may refuse here, packed rows of a block pattern (fixed, bigbird),
    raises NotImplementedError naming it."""
    q, k, v = random_qkv(31, B=2, T=384, N=4, K=kv_heads, dtype=dtype)
    call = dict(causal=causal, segment_ids=packed_segments(32, 2, 384) if segmented else None)
    fn = av.get(name, implementation=implementation, **opts)
    options = {n: x for n, x in av.spec(name).options(**opts).items() if n != "implementation"}
    missing = av.spec(name).implementations[implementation].supports(q, k, v, **call, **options)
    if missing is not None:
        block_pattern = not av.spec(name).mask(causal=causal, **options).shift_invariant
        assert segmented and block_pattern and missing.startswith("segment_ids"), missing
        with pytest.raises(NotImplementedError, match=f"{implementation!r}.*segment_ids"):
            fn(q, k, v, **call)
        return
    out = jax.jit(fn, static_argnames="causal")(q, k, v, **call)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = reference(name, opts)(*as_f32(q, k, v), **call)
    got, want_grads = (
        grads(fn, q, k, v, **call),
        grads(reference(name, opts), *as_f32(q, k, v), **call),
    )
    if dtype == jnp.bfloat16:
        np.testing.assert_allclose(out.astype(jnp.float32), want, **BF16)
        assert_bf16_grads_close(got, want_grads)
        return
    np.testing.assert_allclose(out, want, **F32)
    for which, g, r in zip("qkv", got, want_grads, strict=True):
        np.testing.assert_allclose(g, r, **F32, err_msg=f"d{which}")


@pytest.mark.parametrize("name,implementation,opts,dtype", IMPLEMENTATIONS)
def test_each_implementation_leaks_nothing_from_the_future(name, implementation, opts, dtype):
    fn = av.get(name, implementation=implementation, **opts)
    assert_no_leak(fn, *random_qkv(33, B=1, T=384, dtype=dtype), times=(0, 127, 200, 300))
