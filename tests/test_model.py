"""The Transformer core: shapes, kernel swap equality, packing, training lowers the loss."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer import ModelConfig, TransformerLM, next_token_loss
from transformer.budget import matched, parameter_count
from transformer.model import segment_positions, sinusoidal

TINY = dict(
    vocab_size=61, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48, max_len=64
)


def init(cfg, T=40, B=2, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
    params = TransformerLM(cfg).init(jax.random.key(seed + 1), tokens)["params"]
    return tokens, params


@pytest.mark.parametrize(
    "changes",
    [
        {"positions": "rope"},
        {"positions": "learned"},
        {"positions": "sinusoidal", "norm": "layer"},
        {"positions": "none", "mlp_dim": 0},
    ],
)
def test_logits_shape_and_causality(changes):
    cfg = ModelConfig(**{**TINY, **changes})
    tokens, params = init(cfg)
    logits = TransformerLM(cfg).apply({"params": params}, tokens)
    assert logits.shape == (2, 40, 61) and logits.dtype == jnp.float32
    changed = tokens.at[:, 25:].set((tokens[:, 25:] + 1) % 61)  # a different future
    other = TransformerLM(cfg).apply({"params": params}, changed)
    np.testing.assert_allclose(other[:, :25], logits[:, :25], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, 25:], logits[:, 25:])


@pytest.mark.parametrize(
    "attention,options",
    [
        ("xla", {}),
        ("blockwise", {"block_q": 16, "block_k": 8}),
    ],
)
def test_swapping_the_kernel_keeps_the_logits(attention, options):
    cfg = ModelConfig(**TINY)
    tokens, params = init(cfg)
    segments = jnp.repeat(jnp.arange(2), 20)[None].repeat(2, 0)
    swapped = cfg.replace(attention=attention, attention_options=options)
    for seg in (None, segments):
        a = TransformerLM(cfg).apply({"params": params}, tokens, segment_ids=seg)
        b = TransformerLM(swapped).apply({"params": params}, tokens, segment_ids=seg)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_packed_rows_equal_separate_rows():
    cfg = ModelConfig(**TINY)
    tokens, params = init(cfg, T=32, B=1)
    seg = jnp.repeat(jnp.arange(2), 16)[None]
    model = TransformerLM(cfg)
    packed = model.apply({"params": params}, tokens, segment_ids=seg)
    second = model.apply({"params": params}, tokens[:, 16:])
    np.testing.assert_allclose(packed[:, 16:], second, rtol=1e-5, atol=2e-5)


def test_sinusoidal_positions_follow_the_paper():
    # Vaswani et al. 2017, 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...).
    d = 10
    pe = np.asarray(sinusoidal(jnp.array([[0, 1, 7, 300]]), d))[0]
    for row, pos in enumerate([0, 1, 7, 300]):
        for i in range(d // 2):
            assert pe[row, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / d)), abs=1e-5)
            assert pe[row, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / d)), abs=1e-5)


def test_layer_norm_and_attention_only_blocks_change_the_parameters():
    count = lambda params: sum(x.size for x in jax.tree.leaves(params))  # noqa: E731
    _, rms = init(ModelConfig(**TINY))
    _, layer = init(ModelConfig(**TINY, norm="layer"))
    assert set(rms["block_0"]["attention_norm"]) == {"scale"}
    assert set(layer["block_0"]["attention_norm"]) == {"scale", "bias"}
    _, attention_only = init(ModelConfig(**{**TINY, "mlp_dim": 0}))
    assert "mlp" not in attention_only["block_0"] and "mlp_norm" not in attention_only["block_0"]
    width, mlp = 64, 48  # N * H, mlp_dim
    assert count(rms) - count(attention_only) == 2 * (3 * width * mlp + width)


def test_logits_at_chosen_positions_equal_the_full_logits():
    cfg = ModelConfig(**TINY)
    tokens, params = init(cfg)
    full = TransformerLM(cfg).apply({"params": params}, tokens)
    at = jnp.array([[3, 0, 39], [7, 7, 12]])
    some = TransformerLM(cfg).apply({"params": params}, tokens, logits_at=at)
    assert some.shape == (2, 3, 61)
    chosen = jnp.take_along_axis(full, at[..., None], axis=1)
    np.testing.assert_allclose(some, chosen, rtol=1e-5, atol=1e-5)


def test_segment_positions_restart_per_sequence():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(segment_positions(seg, 9), [[0, 1, 2, 0, 1, 0, 1, 2, 3]])


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown attention variant 'nope'.*dense"):
        ModelConfig(**TINY, attention="nope")
    with pytest.raises(TypeError, match="unknown option.*bogus"):
        ModelConfig(**TINY, attention="blockwise", attention_options={"bogus": 1})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="positions"):
        ModelConfig(**TINY, positions="alibi")
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(**TINY, norm="batch")
    with pytest.raises(ValueError, match="mlp_dim"):
        ModelConfig(**{**TINY, "mlp_dim": -1})


def test_options_read_back_from_json_make_the_same_hashable_config():
    """config.json gives a window pair back as a list: the model must still hash (jit's static
    argument) and equal the one it was saved from, a hybrid's and cross-attention's too."""
    fields = dict(TINY, attention="sliding_window,dense", cross_attention="blockwise",
                  attention_options={"sliding_window": {"window": (4, 2)}},
                  cross_attention_options={"block_k": 8},
                  encoder_attention="sliding_window",
                  encoder_attention_options={"window": (3, 3)})  # fmt: skip
    cfg = ModelConfig(**fields)
    again = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and hash(TransformerLM(again)) == hash(TransformerLM(cfg))


def test_a_hybrid_pattern_repeats_over_the_layers_with_each_variants_options():
    window = {"window": 4, "block_q": 8, "block_k": 8}
    forms = ["sliding_window*2+linear", "sliding_window, sliding_window, linear",
             ("sliding_window", "sliding_window", "linear")]  # fmt: skip
    cfgs = [ModelConfig(**{**TINY, "num_layers": 6}, attention=a,
                        attention_options={"sliding_window": window}) for a in forms]  # fmt: skip
    assert cfgs[0] == cfgs[1] == cfgs[2]
    cfg = cfgs[0]
    assert [cfg.layer_attention(i) for i in range(6)] == ["sliding_window"] * 2 + ["linear"] + [
        "sliding_window"] * 2 + ["linear"]  # fmt: skip
    assert cfg.variants == ("sliding_window", "linear")
    assert cfg.attention_name == "sliding_window*2+linear"
    assert cfg.options_of("sliding_window") == window and cfg.options_of("linear") == {}
    # Layer by layer: the hybrid's logits are those of a model built from the same layers.
    tokens, params = init(cfg, T=24)
    logits = TransformerLM(cfg).apply({"params": params}, tokens)
    linear = cfg.replace(attention="linear*3", attention_options={})
    swapped = TransformerLM(linear).apply({"params": params}, tokens)
    assert not np.allclose(logits, swapped, atol=1e-3)  # the local layers change the result
    single = ModelConfig(**TINY, attention="sliding_window", attention_options=window)
    assert single.attention == "sliding_window" and single.options_of("sliding_window") == window


@pytest.mark.parametrize(
    "attention,options,needle",
    [("dense,", {}, "names no variant"), ("dense*0", {}, "positive int"),
     ("dense,nope", {}, "unknown attention variant 'nope'"),
     ("dense,linear", {"window": 4}, r"map its variants.*\['window'\] is not among them"),
     ("dense,linear,dense", {}, "longer than num_layers=2"),
     ("dense,sliding_window", {"sliding_window": {"bogus": 1}}, "unknown option.*bogus")],
)  # fmt: skip
def test_hybrid_pattern_errors_name_the_problem(attention, options, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        ModelConfig(**TINY, attention=attention, attention_options=options)


def test_remat_gives_the_same_gradients():
    cfg = ModelConfig(**TINY, tie_embeddings=False, attention="blockwise")
    tokens, params = init(cfg)

    def grads(cfg):
        loss = lambda p: next_token_loss(TransformerLM(cfg).apply({"params": p}, tokens), tokens)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(cfg), grads(cfg.replace(remat=True))
    for g, r in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-6)
    assert min(float(jnp.linalg.norm(g)) for g in jax.tree.leaves(plain)) > 0


@pytest.mark.parametrize("attention", ["dense", "blockwise"])
def test_a_few_adam_steps_lower_the_loss(attention):
    cfg = ModelConfig(**TINY, attention=attention, dropout_rate=0.1)
    pattern = jax.random.randint(jax.random.key(3), (8,), 0, cfg.vocab_size)
    tokens = jnp.tile(pattern, (2, 5))  # a tiny repeated sequence, T=40
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(4), tokens)["params"]
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens, deterministic=False, rngs={"dropout": rng})
            return next_token_loss(logits, tokens)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(30):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_parameter_budget_picks_the_closest_width():
    """`matched` against a count by hand over every even head_dim (RoPE) and every mlp_dim."""
    cfg = ModelConfig(vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                      mlp_dim=0, max_len=16, attention="gated_deltanet")  # fmt: skip
    budget = parameter_count(cfg.replace(attention="dense", head_dim=12))
    counts = {h: parameter_count(cfg.replace(head_dim=h)) for h in range(2, 26, 2)}
    best = min(counts, key=lambda h: (abs(counts[h] - budget), h))
    assert matched(cfg, budget).head_dim == best < 12  # its own layer: narrower than dense
    mlp = {m: parameter_count(cfg.replace(mlp_dim=m)) for m in range(0, 12)}
    wider = mlp[5] + 1  # between the counts at 5 and 6: 5 is closer
    assert matched(cfg, wider, "mlp_dim").mlp_dim == 5 and mlp[5] < wider < mlp[6]
    with pytest.raises(ValueError, match="not 'num_heads'"):
        matched(cfg, budget, "num_heads")
    with pytest.raises(ValueError, match="more than the budget"):
        matched(cfg, 10)
