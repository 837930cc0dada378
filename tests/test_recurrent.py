"""The recurrent-state family (retnet, gla, mamba2, deltanet, gated_deltanet) with its gates.

The conformance suite and test_decode.py run these variants without gates; here every variant
of the family (found in the registry) gets random gates of the axes it declares, and the chunked
kernel must equal the token-by-token reference in output and in the gradients of q, k, v and
every gate, at lengths that are not a multiple of the chunk, with GQA, packed rows and decoding.
A plain float64 recurrence written from the papers' equations checks the references themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants import recurrent
from attention_variants.retnet import log_decays

FAMILY = [n for n in av.names() if av.spec(n).family == "recurrent_state"]
F32 = dict(rtol=2e-5, atol=2e-5)


def random_gates(name, q, seed, strong=False):
    """Gates of the variant's declared axes: log decays in [-1, 0] (strong: [-60, -10] on a
    third of the tokens), write strengths in (0, 1)."""
    sizes = dict(zip("BTNH", q.shape, strict=True))
    gates = {}
    for i, (gate, axes) in enumerate(sorted(av.spec(name).arguments.items())):
        key = jax.random.key(seed + i)
        shape = tuple(sizes[a] for a in axes)
        x = jax.random.uniform(key, shape, jnp.float32)
        if gate == "log_decay":
            x = -x
            if strong:
                x = jnp.where(jax.random.uniform(jax.random.key(seed + 7), shape) < 0.3,
                              -10.0 - 50.0 * x**2, x)  # fmt: skip
        gates[gate] = x
    return gates


def grads(fn, q, k, v, gates, **kw):
    """Gradients of a random projection of the output in q, k, v and each gate, one jit."""
    cot = jax.random.normal(jax.random.key(99), q.shape)

    def loss(q, k, v, gates):
        return jnp.sum(fn(q, k, v, **gates, **kw).astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gates)


def assert_tree_close(got, want, tol=F32):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        np.testing.assert_allclose(g, w, **tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("chunk,T", [(8, 45), (16, 45), (64, 45), (5, 23)])
def test_chunked_equals_the_recurrence_with_gates(name, chunk, T):
    """Forward and the gradients of q, k, v and every gate; GQA (N=4 query heads, K=2)."""
    q, k, v = random_qkv(1, T=T, N=4, K=2)
    gates = random_gates(name, q, 2)
    fn, ref = av.get(name, chunk=chunk), av.spec(name).bound_reference()
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, **gates), ref(q, k, v, **gates), **F32)
    assert_tree_close(grads(fn, q, k, v, gates), grads(ref, q, k, v, gates))


@pytest.mark.parametrize("name", FAMILY)
def test_strong_decays_stay_finite_and_exact(name):
    """Log decays down to -60 inside a chunk: exponents are differences b_t - b_s <= 0, so
    nothing overflows, forward or backward."""
    q, k, v = random_qkv(3, T=40)
    gates = random_gates(name, q, 4, strong=True)
    if "log_decay" not in gates:
        pytest.skip("no decay argument")
    fn, ref = av.get(name, chunk=16), av.spec(name).bound_reference()
    out = fn(q, k, v, **gates)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref(q, k, v, **gates), **F32)
    got = grads(fn, q, k, v, gates)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))
    assert_tree_close(got, grads(ref, q, k, v, gates), tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("name", FAMILY)
def test_packed_row_with_gates_equals_each_document_alone(name):
    lengths = (11, 5, 23, 9)
    q, k, v = random_qkv(5, B=1, T=sum(lengths))
    gates = random_gates(name, q, 6)
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), jnp.array(lengths))[None]
    fn = av.get(name, chunk=8)
    out = jax.jit(fn)(q, k, v, segment_ids=seg, **gates)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = fn(q[:, part], k[:, part], v[:, part], **{g: x[:, part] for g, x in gates.items()})
        np.testing.assert_allclose(out[:, part], alone, **F32, err_msg=f"document at {start}")
        start += n


@pytest.mark.parametrize("name", FAMILY)
def test_bfloat16_with_gates_close_to_float32(name):
    q, k, v = random_qkv(7, T=40, dtype=jnp.bfloat16)
    gates = random_gates(name, q, 8)
    fn, ref = av.get(name, chunk=16), av.spec(name).bound_reference()
    out = fn(q, k, v, **gates)
    assert out.dtype == jnp.bfloat16
    want = ref(*(x.astype(jnp.float32) for x in (q, k, v)), **gates)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=0.03, atol=0.02 * scale)


@pytest.mark.parametrize("name", FAMILY)
def test_decoding_with_gates_equals_the_full_forward(name):
    """A prompt of 13 tokens in one chunk, then 9 one at a time, gates per token."""
    q, k, v = random_qkv(9, B=2, T=22, N=4, K=2)
    gates = random_gates(name, q, 10)
    decoder = av.decoder(name, chunk=8)
    state = decoder.init(2, 22, 2, 16, num_heads=4)
    extend = jax.jit(decoder.extend)
    outs = []
    for a, b in [(0, 13)] + [(t, t + 1) for t in range(13, 22)]:
        part = {g: x[:, a:b] for g, x in gates.items()}
        out, state = extend(state, q[:, a:b], k[:, a:b], v[:, a:b], jnp.int32(a), **part)
        outs.append(out)
    want = av.spec(name).bound_reference()(q, k, v, **gates)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, **F32)
    assert av.cache_bytes(state) == av.cache_bytes(decoder.init(2, 10**6, 2, 16, num_heads=4))
    with pytest.raises(ValueError, match=f"{name}: the state holds 2 heads.*num_heads=4"):
        decoder.extend(decoder.init(2, 22, 2, 16), q[:, :1], k[:, :1], v[:, :1], 0)


def recurrence64(q, k, v, log_decay, beta, delta, scale):
    """The papers' recurrence in float64 numpy, one head at a time (q, k already normalised
    for the delta rule): S_t = D_t S_{t-1} + k_t^T v_t, or the gated delta rule."""
    B, T, N, H = q.shape
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            S = np.zeros((H, H))
            for t in range(T):
                qt, kt, vt = q[b, t, n] * scale, k[b, t, n], v[b, t, n]
                decay = np.exp(log_decay[b, t, n]) if log_decay is not None else 1.0
                S = (decay * S.T).T if np.ndim(decay) else decay * S  # diag(decay) S
                if delta:
                    S = S + beta[b, t, n] * np.outer(kt, vt - kt @ S)
                else:
                    S = S + np.outer(kt, vt)
                out[b, t, n] = qt @ S
    return out


def test_the_references_follow_the_papers_equations():
    """Each variant's reference against a float64 loop of its paper's recurrence: RetNet's
    gamma_h = 1 - 2^(-5-h), GLA's decay per key feature, Mamba-2's per head, DeltaNet's
    L2-normalised delta rule, Gated DeltaNet's decayed one (MHA: one state per head)."""
    q, k, v = random_qkv(11, B=1, T=12, N=3, K=3, H=4)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    unit = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)  # noqa: E731
    gates = {n: random_gates(n, q, 12) for n in FAMILY}
    g64 = {n: {g: np.asarray(x, np.float64) for g, x in gs.items()} for n, gs in gates.items()}
    retnet_decay = np.broadcast_to(np.log(1 - 2.0 ** (-5 - np.arange(3))), (1, 12, 3))
    np.testing.assert_allclose(log_decays(3), retnet_decay[0, 0], rtol=1e-6)
    want = {
        "retnet": recurrence64(q64, k64, v64, retnet_decay, None, False, 0.5),
        "gla": recurrence64(q64, k64, v64, g64["gla"]["log_decay"], None, False, 0.5),
        "mamba2": recurrence64(q64, k64, v64, g64["mamba2"]["log_decay"], None, False, 0.5),
        "deltanet": recurrence64(
            unit(q64), unit(k64), v64, None, g64["deltanet"]["beta"], True, 0.5
        ),  # fmt: skip
        "gated_deltanet": recurrence64(
            unit(q64),
            unit(k64),
            v64,
            g64["gated_deltanet"]["log_decay"],
            g64["gated_deltanet"]["beta"],
            True,
            0.5,
        ),  # fmt: skip
    }
    assert set(want) <= set(FAMILY)
    for name, expected in want.items():
        got = av.spec(name).bound_reference()(q, k, v, **gates[name])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", FAMILY)
def test_gates_are_checked_by_name(name):
    q, k, v = random_qkv(13, T=10)
    gates = random_gates(name, q, 14)
    fn = av.get(name)
    for gate, x in gates.items():
        with pytest.raises(ValueError, match=f"{name}: {gate} must be"):
            fn(q, k, v, **{**gates, gate: x[:, :5]})
        bad = 0.5 if gate == "log_decay" else 1.5
        with pytest.raises(ValueError, match=f"{name}: {gate} must lie in"):
            fn(q, k, v, **{**gates, gate: x.at[0, 3, 1].set(bad)})
    with pytest.raises(TypeError, match="unknown option"):
        fn(q, k, v, gate_that_does_not_exist=1.0)
    with pytest.raises(NotImplementedError, match=f"{name}: causal=False"):
        fn(q, k, v, causal=False)


def test_packed_gates_under_jit_reset_at_each_start():
    """Traced ids and gates: a gate's value at a document start does not leak the previous
    document's state (the state restarts at zero whatever the decay)."""
    name = "gated_deltanet"
    q, k, v = random_qkv(15, T=30)
    seg = packed_segments(16, 2, 30, max_segments=4)
    gates = random_gates(name, q, 17)
    fn = jax.jit(lambda q, k, v, s, g: av.get(name, chunk=8)(q, k, v, segment_ids=s, **g))
    ref = av.spec(name).bound_reference()(q, k, v, segment_ids=seg, **gates)
    np.testing.assert_allclose(fn(q, k, v, seg, gates), ref, **F32)


@pytest.mark.parametrize("name", FAMILY)
def test_the_variants_layer_keeps_packed_documents_apart(name):
    """Through the model with the paper's layer (short convolution, gates, output norm): a
    packed row's second document equals that document alone, so neither the convolution's taps
    nor the state cross a document start; variant_layer=False adds no parameters to dense's."""
    from transformer import ModelConfig, TransformerLM

    sizes = dict(vocab_size=31, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=16)
    model = TransformerLM(ModelConfig(attention=name, attention_options={"chunk": 4}, **sizes))
    tokens = jax.random.randint(jax.random.key(18), (2, 15), 0, 31)
    params = model.init(jax.random.key(19), tokens)["params"]
    seg = jnp.array([[0] * 6 + [1] * 9, [0] * 5 + [1] * 2 + [0] * 8], jnp.int32)
    packed = model.apply({"params": params}, tokens, segment_ids=seg)
    # Row 1's last document repeats the first one's id: a new document all the same (a run).
    for row, start in ((0, 6), (1, 7)):
        alone = model.apply({"params": params}, tokens[row : row + 1, start:])
        np.testing.assert_allclose(packed[row : row + 1, start:], alone, **F32)
    plain = TransformerLM(ModelConfig(attention=name, variant_layer=False, **sizes))
    dense = TransformerLM(ModelConfig(attention="dense", **sizes))
    count = lambda m: sum(x.size for x in jax.tree.leaves(m.init(jax.random.key(0), tokens)))  # noqa: E731
    assert count(plain) == count(dense) < count(model)


@pytest.mark.parametrize("delta", [False, True])
def test_groups_of_chunks_change_nothing_but_rounding(delta):
    """The engine's chunks run in groups (CPU) or all at once (accelerators): every grouping,
    with the padding to whole groups, gives the recurrence's output and final state."""
    q, k, v = random_qkv(20, T=45, N=2, K=2)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    gates = dict(log_decay=-jax.random.uniform(jax.random.key(21), (2, 45, 2)))
    if delta:
        gates["beta"] = jax.random.uniform(jax.random.key(22), (2, 45, 2))
    seg = packed_segments(23, 2, 45)
    want, final = recurrent.recurrence(q, k, v, delta=delta, segment_ids=seg, **gates)
    for group in (1, 2, 3, 100):
        out, state = recurrent.chunked(q, k, v, delta=delta, segment_ids=seg, chunk=4,
                                       group=group, **gates)  # fmt: skip
        np.testing.assert_allclose(out, want, **F32, err_msg=f"group={group}")
        np.testing.assert_allclose(state, final, **F32, err_msg=f"group={group}")
