"""The model's decode path (flax's cache convention) and `generate`, for every variant that
decodes: logits fed token by token or in chunks equal the full forward's."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_cases

import attention_variants as av
from transformer import ModelConfig, TransformerLM, generate, sample_logits

SMALL = small_cases()
F32 = dict(rtol=1e-5, atol=1e-5)


def tiny(attention="dense", options=(), **changes):
    model = tiny_model(attention, options, **changes)
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 37)
    return model, init_params(own_layer(attention), **changes), tokens


def own_layer(attention: str) -> str:
    """The variant whose parameters the model needs: itself when its paper's layer adds some
    (convolutions, gates, output norm), else dense (the kernel then holds none)."""
    spec = av.spec(attention)
    gates = any(axes.startswith("BT") for axes in spec.arguments.values())
    return attention if spec.layer != av.Layer() or gates else "dense"


def tiny_model(attention="dense", options=(), **changes):
    sizes = dict(
        vocab_size=37, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32,
        max_len=64,
    )  # fmt: skip
    sizes.update(changes)
    return TransformerLM(ModelConfig(attention=attention, attention_options=options, **sizes))


def init_decode(model, B, max_len):
    """The model's variables from its decode init on B rows of max_len tokens. It runs eagerly:
    the same [2, 24] in every test shares the compiled ops."""
    return model.init(jax.random.key(0), jnp.zeros((B, max_len), jnp.int32), decode=True)


@functools.cache
def init_params(attention="dense", **changes):
    """Random (never zero) parameters, made once per kind of model: attention kernels hold no
    parameters, and the init does not depend on the tokens, so the dense model's serve every
    variant that adds no layer of its own (`own_layer`: the same values as its own init)."""
    return init_decode(tiny_model(attention, **changes), 2, 24)["params"]


@functools.cache
def empty_cache(model, B, max_len):
    """The model's fresh decode cache for B rows of max_len tokens (immutable: shared)."""
    return init_decode(model, B, max_len)["cache"]


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens):
    """The full forward's logits, jitted once per model config (shared across tests)."""
    return model.apply({"params": params}, tokens)


@functools.partial(jax.jit, static_argnums=0)
def extend(model, params, cache, part):
    logits, variables = model.apply(
        {"params": params, "cache": cache}, part, decode=True, mutable=["cache"]
    )
    return logits, variables["cache"]


def decode_logits(model, params, tokens, chunks, max_len=None):
    """Logits of every position, fed through the cache in chunks of the given sizes."""
    B, T = tokens.shape
    cache = empty_cache(model, B, max_len or T)
    outs, start = [], 0
    for size in chunks:
        logits, cache = extend(model, params, cache, tokens[:, start : start + size])
        outs.append(logits)
        start += size
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name,opts", SMALL)
def test_token_by_token_logits_equal_the_full_forward(name, opts):
    model, params, tokens = tiny(name, opts)
    full = forward(model, params, tokens)
    logits, cache = decode_logits(model, params, tokens, [1] * 19, max_len=24)
    np.testing.assert_allclose(logits, full, **F32)
    assert int(cache["position"]) == 19


def test_a_hybrids_layers_decode_each_through_its_own_cache():
    """Window, recurrent and KV caches in one model: token by token equals the full forward."""
    pattern = "sliding_window,gated_deltanet,dense"
    options = {"sliding_window": {"window": 4}, "gated_deltanet": {"chunk": 4}}
    model = tiny_model(pattern, options, num_layers=3)
    params = init_decode(model, 2, 24)["params"]
    layers = [params[f"block_{i}"]["attention"] for i in range(3)]
    assert ["gates" in layer for layer in layers] == [False, True, False]
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 37)
    full = forward(model, params, tokens)
    logits, cache = decode_logits(model, params, tokens, [1] * 12 + [7], max_len=24)
    np.testing.assert_allclose(logits, full, **F32)
    window, state, kv = (cache[f"block_{i}"]["attention"]["attention"] for i in range(3))
    assert window.k.shape[1] < 19 <= kv.k.shape[1]  # the last keys only; every position
    assert state.shape == (2, 4, 8, 8)  # a state per query head, H x H


@pytest.mark.parametrize("name,opts", [("sliding_window", {"window": 4, "sinks": 2}),
                                       ("blockwise", {"block_q": 8, "block_k": 8})])  # fmt: skip
def test_alibi_softcap_and_learned_sinks_decode_as_the_full_forward(name, opts):
    """ALiBi without other positions (the length-extrapolation baseline), a soft cap, and a
    learned sink per head and layer: window and KV caches give the full forward's logits."""
    changes = dict(positions="none", attention_sinks=True)
    model = tiny_model(name, {**opts, "bias": "alibi", "softcap": 5.0}, **changes)
    params = init_params(own_layer(name), **changes)
    assert params["block_0"]["attention"]["sink_logits"].shape == (4,)
    params = jax.tree.map(lambda x: x, params)  # sinks away from their zero init
    params["block_0"]["attention"]["sink_logits"] = jnp.array([2.0, -1.0, 0.5, 0.0])
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 37)
    full = forward(model, params, tokens)
    logits, _ = decode_logits(model, params, tokens, [1] * 10 + [9], max_len=24)
    np.testing.assert_allclose(logits, full, **F32)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "none"])
def test_chunked_prefill_with_each_kind_of_positions(positions):
    model, params, tokens = tiny("sliding_window", {"window": 6}, positions=positions)
    full = forward(model, params, tokens)
    for chunks in ([19], [7, 7, 5], [1, 5, 7, 1, 5]):  # 4 sizes: 4 compiles
        logits, _ = decode_logits(model, params, tokens, chunks, max_len=24)
        np.testing.assert_allclose(logits, full, **F32, err_msg=str(chunks))


@pytest.mark.parametrize("name,opts", [("blockwise", {"block_q": 4, "block_k": 4}), ("linear", {})])
def test_greedy_generation_equals_an_argmax_loop_over_the_full_forward(name, opts):
    model, params, tokens = tiny(name, opts)
    prompt = tokens[:, :5]
    out = generate(model, params, prompt, 6, jax.random.key(0), temperature=0.0)
    # The slow way: the whole sequence again for every token. The model is causal, so the
    # logits at position t see tokens [0, t] only: one jitted length serves every step, its
    # tail (random tokens, not yet generated) overwritten one token at a time.
    seq = tokens[:, :11]
    for t in range(5, 11):
        logits = forward(model, params, seq)
        seq = seq.at[:, t].set(jnp.argmax(logits[:, t - 1], -1))
    np.testing.assert_array_equal(out, seq)
    chunked = generate(model, params, prompt, 6, jax.random.key(0), temperature=0.0,
                       prefill_chunk=2)  # fmt: skip
    np.testing.assert_array_equal(chunked, seq)


def test_sampling_is_deterministic_for_a_key_and_follows_top_k():
    model, params, tokens = tiny(num_layers=1)  # one block: sampling needs no depth
    prompt = tokens[:, :4]
    draw = lambda seed, **kw: generate(model, params, prompt, 12, jax.random.key(seed), **kw)  # noqa: E731
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    np.testing.assert_array_equal(draw(5, top_k=1), draw(0, temperature=0.0))
    np.testing.assert_array_equal(draw(5, top_p=1e-6), draw(0, temperature=0.0))


def test_sample_logits_keeps_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = lambda **kw: jax.jit(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0]))(keys[:400])  # noqa: E731
    assert set(np.asarray(draws(top_k=2))) == {0, 1}
    assert set(np.asarray(draws(top_p=0.7))) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    counts = np.bincount(
        jax.jit(jax.vmap(lambda k: sample_logits(logits, k)[0]))(keys), minlength=4
    )
    np.testing.assert_allclose(counts / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_requests_beyond_the_kv_cache_are_refused_naming_the_numbers():
    model, params, tokens = tiny()
    with pytest.raises(ValueError, match="5 tokens plus max_new_tokens=10 is 15.*max_len=12"):
        generate(model, params, tokens[:, :5], 10, jax.random.key(0), max_len=12)
    # A window cache has no such limit: 3x the window, past max_len, still the full forward.
    model, params, tokens = tiny("sliding_window", {"window": 4}, positions="rope")
    out = generate(model, params, tokens[:, :5], 10, jax.random.key(0), max_len=12,
                   temperature=0.0)  # fmt: skip
    greedy = jnp.argmax(forward(model, params, out[:, :-1]), -1)
    np.testing.assert_array_equal(out[:, 5:], greedy[:, 4:])


@pytest.mark.parametrize(
    "option,value,needle",
    [("temperature", -1.0, "temperature must be >= 0"), ("top_k", 38, "top_k must be in"),
     ("top_p", 0.0, "top_p must be in")],
)  # fmt: skip
def test_sampling_options_out_of_range_are_named(option, value, needle):
    model, params, tokens = tiny()
    with pytest.raises(ValueError, match=needle):
        generate(model, params, tokens[:, :3], 2, jax.random.key(0), **{option: value})


def test_model_decode_errors():
    model, params, tokens = tiny()
    variables = {"params": params, "cache": empty_cache(model, 2, 24)}  # the shared cache
    longer = jnp.concatenate([tokens, tokens], axis=1)
    with pytest.raises(ValueError, match="max_len=24 tokens: 0 cached plus 25 new"):
        model.apply(variables, longer[:, :25], decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="needs a cache"):  # [2, 24]: the init's eager shapes
        model.apply({"params": params}, longer[:, :24], decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match="segment_ids must be None"):
        model.apply(variables, tokens[:, :3], jnp.zeros((2, 3), jnp.int32), decode=True,
                    mutable=["cache"])  # fmt: skip
