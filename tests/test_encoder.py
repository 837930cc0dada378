"""Encoders, classifiers and the encoder-decoder: bidirectional attention within documents,
pooling over real tokens only, every non-causal variant trains in an encoder, decoding through
the cache equals the full forward, cross-attention reads only its own source document."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_cases

import attention_variants as av
from transformer import EncoderDecoder, ModelConfig, TransformerLM, generate
from transformer.encoder_decoder import shift_right

SIZES = dict(vocab_size=29, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=16,
             max_len=32)  # fmt: skip
F32 = dict(rtol=1e-5, atol=1e-5)
SMALL = small_cases()


def tokens(seed, B, T, low=1):
    return jax.random.randint(jax.random.key(seed), (B, T), low, SIZES["vocab_size"])


@pytest.mark.parametrize(
    "attention,options", [("dense", {}), ("sliding_window", {"window": (3, 3)})]
)
def test_an_encoder_sees_later_tokens_of_its_document_only(attention, options):
    cfg = ModelConfig(**SIZES, attention=attention, attention_options=options, causal=False)
    model = TransformerLM(cfg)
    x = tokens(0, 1, 16)
    documents = jnp.array([[1] * 10 + [2] * 6])
    params = model.init(jax.random.key(1), x, documents)["params"]
    before = model.apply({"params": params}, x, documents)
    after = model.apply({"params": params}, x.at[0, 8].set(x[0, 8] % 28 + 1), documents)
    changed = np.abs(np.asarray(after - before)).max(-1)[0] > 1e-6
    assert changed[6:8].all()  # earlier positions of the same document (within the window)
    assert not changed[10:].any()  # never the next document


@pytest.mark.parametrize("name,opts", SMALL)
def test_every_variant_with_a_non_causal_form_trains_an_encoder_step(name, opts):
    """An encoder classifier of each registered variant: one AdamW step on its loss gives a
    finite loss, finite nonzero gradients and new parameters; a causal-only variant is refused
    at construction, named."""
    fields = dict(SIZES, attention=name, attention_options=opts, causal=False, num_classes=3)
    if av.spec(name).causal_only:
        with pytest.raises(ValueError, match=name):
            ModelConfig(**fields)
        return
    model = TransformerLM(ModelConfig(**fields))
    x, labels = tokens(2, 2, 32), jnp.array([0, 2])
    documents = jnp.array([[1] * 32, [1] * 20 + [0] * 12])  # the second row padded
    params = model.init(jax.random.key(3), x, documents)["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, x, documents)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    optimizer = optax.adamw(1e-2)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert np.isfinite(float(loss)) and all(np.isfinite(norms)) and max(norms) > 0
    query = new["block_0"]["attention"]["query"]["kernel"]
    assert not np.allclose(query, params["block_0"]["attention"]["query"]["kernel"])


def test_the_classifier_pools_the_real_tokens_only():
    cfg = ModelConfig(**SIZES, causal=False, num_classes=4)
    model = TransformerLM(cfg)
    x = tokens(4, 2, 12)
    documents = jnp.array([[1] * 7 + [0] * 5, [1] * 12])
    params = model.init(jax.random.key(5), x, documents)["params"]
    logits = model.apply({"params": params}, x, documents)
    repadded = x.at[0, 7:].set(jnp.arange(5) + 3)  # other tokens on the first row's padding
    np.testing.assert_allclose(model.apply({"params": params}, repadded, documents), logits, **F32)
    alone = model.apply({"params": params}, x[:1, :7])  # the first row without its padding
    np.testing.assert_allclose(logits[:1], alone, **F32)
    cls = TransformerLM(cfg.replace(pooling="cls"))
    params = cls.init(jax.random.key(5), x, documents)["params"]
    logits = cls.apply({"params": params}, x, documents)
    np.testing.assert_allclose(cls.apply({"params": params}, repadded, documents), logits, **F32)
    assert not np.allclose(cls.apply({"params": params}, x.at[0, 6].set(1), documents), logits)


def tiny_encoder_decoder(attention="dense", options=(), cross="dense", **changes):
    fields = dict(SIZES, attention=attention, attention_options=options, cross_attention=cross,
                  **changes)  # fmt: skip
    if av.spec(attention).causal_only:
        fields["encoder_attention"] = "dense"  # the decoder's variant is causal-only
    return EncoderDecoder(ModelConfig(**fields))


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, inputs, targets, inputs_ids=None, targets_ids=None):
    return model.apply({"params": params}, inputs, targets, inputs_ids, targets_ids)


@functools.partial(jax.jit, static_argnums=0)
def init(model, inputs, targets, inputs_ids):
    return model.init(jax.random.key(8), inputs, targets, inputs_ids)


@functools.partial(jax.jit, static_argnums=0)
def prepare_decoding(model, inputs, targets, inputs_ids):
    """Parameters, the full forward's logits, an empty cache and the encoder's output (one
    compiled function: the decoding test pays one compilation for them per variant)."""
    params = model.init(jax.random.key(8), inputs, targets, inputs_ids)["params"]
    full = model.apply({"params": params}, inputs, targets, inputs_ids)
    empty = jnp.zeros_like(targets)
    cache = model.init(jax.random.key(8), inputs, empty, inputs_ids, decode=True)["cache"]
    encoded = model.apply({"params": params}, inputs, inputs_ids, method="encode")
    return params, full, cache, encoded


@functools.partial(jax.jit, static_argnums=0)
def extend(model, params, cache, encoded, inputs, part, inputs_ids):
    logits, variables = model.apply(
        {"params": params, "cache": cache}, encoded, inputs, part, inputs_ids, decode=True,
        mutable=["cache"], method="decode",
    )  # fmt: skip
    return logits, variables["cache"]


@pytest.mark.parametrize(
    "name,opts,cross",
    [(*case.values, ("dense", "blockwise")[i % 2]) for i, case in enumerate(SMALL)],
    ids=[f"{case.id}-{('dense', 'blockwise')[i % 2]}" for i, case in enumerate(SMALL)],
)
def test_token_by_token_decoding_equals_the_full_forward(name, opts, cross):
    model = tiny_encoder_decoder(name, opts, cross)
    inputs, targets = tokens(6, 2, 12), tokens(7, 2, 7)
    inputs_ids = jnp.array([[1] * 9 + [0] * 3, [1] * 12])  # the first source padded
    params, full, cache, encoded = prepare_decoding(model, inputs, targets, inputs_ids)
    fed, steps = shift_right(targets), []
    for t in range(7):  # after the first step the cross-attention reads its keys from the cache
        source = encoded if t == 0 else jnp.zeros_like(encoded)
        logits, cache = extend(model, params, cache, source, inputs, fed[:, t : t + 1],
                               inputs_ids)  # fmt: skip
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, **F32)
    with pytest.raises(ValueError, match=r"made for a source \[B, S\] = \(2, 12\), not \(2, 9\)"):
        extend(model, params, cache, encoded[:, :9], inputs[:, :9], fed[:, :1], inputs_ids[:, :9])


def test_cross_attention_reads_only_the_source_document_of_each_target():
    """Two pairs packed in a row: changing the second source changes only the second target's
    logits; the source's padding changes nothing; the packed row equals the pairs alone."""
    model = tiny_encoder_decoder(cross="blockwise", cross_attention_options={"block_k": 4})
    inputs, targets = tokens(9, 1, 12), tokens(10, 1, 10)
    inputs_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    targets_ids = jnp.array([[1] * 6 + [2] * 4])
    params = init(model, inputs, targets, inputs_ids)["params"]
    apply = functools.partial(forward, model, params)
    packed = apply(inputs, targets, inputs_ids, targets_ids)
    second = apply(inputs.at[0, 6].set(inputs[0, 6] % 28 + 1), targets, inputs_ids, targets_ids)
    changed = np.abs(np.asarray(second - packed)).max(-1)[0] > 1e-6
    assert not changed[:6].any() and changed[6:].all()
    repadded = apply(inputs.at[0, 9:].set(7), targets, inputs_ids, targets_ids)
    np.testing.assert_allclose(repadded, packed, **F32)
    np.testing.assert_allclose(packed[:, :6], apply(inputs[:, :5], targets[:, :6]), **F32)
    np.testing.assert_allclose(packed[:, 6:], apply(inputs[:, 5:9], targets[:, 6:]), **F32)


def test_greedy_generation_of_the_encoder_decoder_equals_an_argmax_loop():
    model = tiny_encoder_decoder()
    inputs, inputs_ids = tokens(12, 2, 8), jnp.array([[1] * 8, [1] * 5 + [0] * 3])
    params = init(model, inputs, inputs, inputs_ids)["params"]
    write = functools.partial(generate, model, params, inputs, 6, jax.random.key(0),
                              temperature=0, inputs_segment_ids=inputs_ids)  # fmt: skip
    out = write(max_len=6)  # the start token and 5 written tokens fill the cache
    assert out.shape == (2, 6)
    with pytest.raises(ValueError, match=r"but the last: 6, more than the KV cache.s max_len=5"):
        write(max_len=5)
    written = jnp.zeros((2, 6), jnp.int32)  # what follows position t does not change its logits
    for t in range(6):
        logits = forward(model, params, inputs, written, inputs_ids)
        written = written.at[:, t].set(jnp.argmax(logits[:, t], -1))
    np.testing.assert_array_equal(out, written)


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(attention="mamba2", causal=False), "mamba2"),
        (dict(cross_attention="deltanet"), "cross_attention='deltanet'"),
        (dict(encoder_attention="gla"), "gla"),
        (dict(pooling="last"), "pooling"),
        (dict(num_classes=-1), "num_classes"),
        (dict(num_classes=2, pooling="cls"), "pooling='cls' needs causal=False"),
        (dict(encoder_attention_options={"window": 4}), "need an encoder_attention"),
    ],
)
def test_encoder_config_errors_name_the_problem(fields, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{**SIZES, **fields})


def test_an_encoder_decoder_of_a_causal_only_encoder_is_refused_at_construction():
    config = ModelConfig(**SIZES, attention="mamba2")  # a decoder-only model may use it
    with pytest.raises(ValueError, match="'mamba2'"):
        EncoderDecoder(config)
