"""TransformerLM: a decoder-only Flax (Linen) model whose attention kernel is a registry name.

Pre-norm blocks (RMSNorm, or LayerNorm), grouped-query attention with RoPE (or learned,
sinusoidal or no positions), gated (SwiGLU) MLP (or none: attention-only blocks). The layer
owns projections and positions; the kernel only sees q [B,T,N,H], k, v [B,S,K,H], so swapping
`config.attention` changes nothing else (same parameters, same shapes, unless a variant brings
its own layer: `attention_variants.Layer`). A hybrid names a pattern of variants that repeats
over the blocks (`ModelConfig.attention`), each block with its own kernel and cache.

Decoding follows flax's convention: `init(rng, zeros [B, max_len], decode=True)["cache"]` is an
empty cache (the variant's own, `attention_variants.decoding`: KV, window or recurrent), and
`apply({"params": p, "cache": c}, tokens [B, t], decode=True, mutable=["cache"])` appends t >= 1
tokens at the cache's position and returns their logits [B, t, V] with the updated cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import attention_variants as av
from attention_variants.common import run_starts
from transformer import mixers
from transformer.config import ModelConfig


def segment_positions(segment_ids, T: int):
    """Position of each token within its document (a run of equal ids), as the attention
    masks use: [B, T] -> [B, T] int32."""
    index = jnp.arange(T, dtype=jnp.int32)
    if segment_ids is None:
        return index[None]
    return index - run_starts(segment_ids)


def sinusoidal(positions, width: int):
    """Vaswani et al. 2017, Section 3.5: PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) =
    cos(p / 10000^(2i/D)), for integer positions [B, T] -> [B, T, D] float32."""
    i = jnp.arange(0, width, 2, dtype=jnp.float32)  # 2i
    angle = positions[..., None].astype(jnp.float32) / 10_000.0 ** (i / width)  # [B, T, D/2]
    pe = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # [B, T, D/2, 2]
    return pe.reshape(*positions.shape, -1)[..., :width]


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    norm = nn.RMSNorm if cfg.norm == "rms" else nn.LayerNorm
    return norm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def apply_rope(x, positions, base: float):
    """Rotary embeddings (Su et al. 2021) on x [B, T, heads, H] at integer positions [B, T]."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
    sin, cos = jnp.sin(angle)[:, :, None], jnp.cos(angle)[:, :, None]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def heads_projection(cfg: ModelConfig, heads: int, name: str) -> nn.Module:
    """x [B, T, D] -> [B, T, heads, H], no bias."""
    return nn.DenseGeneral(
        (heads, cfg.head_dim),
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name=name,
    )


def output_projection(cfg: ModelConfig) -> nn.Module:
    """The heads' outputs [B, T, N, H] -> [B, T, D], no bias."""
    return nn.DenseGeneral(
        cfg.width,
        axis=(-2, -1),
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="out",
    )


class Attention(nn.Module):
    """Multi-head self-attention with GQA; the kernel comes from the registry by name."""

    config: ModelConfig
    variant: str  # the registry name of this layer's kernel
    causal: bool = True  # False: bidirectional (an encoder)

    @nn.compact
    def __call__(self, x, positions, segment_ids, decode: bool = False, position=None):
        cfg = self.config
        q = heads_projection(cfg, cfg.num_heads, "query")(x)  # [B, T, N, H]
        k = heads_projection(cfg, cfg.num_kv_heads, "key")(x)  # [B, T, K, H]
        v = heads_projection(cfg, cfg.num_kv_heads, "value")(x)  # [B, T, K, H]
        spec = av.spec(self.variant)
        layer = spec.layer if cfg.variant_layer else av.Layer()
        if layer.conv:
            q, k, v = (
                mixers.ShortConv(layer.conv, cfg.dtype, cfg.param_dtype, name=f"{name}_conv")(
                    t, segment_ids, decode
                )
                for t, name in ((q, "query"), (k, "key"), (v, "value"))
            )
        if cfg.positions == "rope":
            q, k = (apply_rope(t, positions, cfg.rope_base) for t in (q, k))
        gates = {}
        axes = tuple(sorted((n, a) for n, a in spec.arguments.items() if a.startswith("BT")))
        if cfg.variant_layer and axes:  # per-token gates, computed from the layer's input
            heads = (cfg.num_heads, cfg.head_dim)
            gates = mixers.Gates(axes, *heads, cfg.param_dtype, name="gates")(x)
        if cfg.attention_sinks and "sink_logits" in spec.arguments:  # learned, one per head
            init = nn.initializers.zeros_init()
            gates["sink_logits"] = self.param("sink_logits", init, (cfg.num_heads,), jnp.float32)
        if decode:
            out = self.cached(q, k, v, position, gates)
        else:
            kernel = av.get(self.variant, **cfg.options_of(self.variant))
            out = kernel(q, k, v, causal=self.causal, segment_ids=segment_ids, **gates)
        if layer.norm or layer.output_gate or layer.skip:
            out = mixers.OutputGate(layer.norm, layer.output_gate, layer.skip, cfg.dtype,
                                    cfg.param_dtype, name="output")(out, x, v)  # fmt: skip
        return output_projection(cfg)(out)

    def cached(self, q, k, v, position, gates):
        """Attention of the new tokens through the cache (created, empty, at init)."""
        cfg = self.config
        decoder = av.decoder(self.variant, **cfg.options_of(self.variant))
        B, T = q.shape[:2]
        if not self.is_initializing() and not self.has_variable("cache", "attention"):
            raise ValueError(
                "decode=True needs a cache: make one with "
                "model.init(rng, zeros [B, max_len], decode=True)['cache'] and pass it with "
                "mutable=['cache']"
            )
        K, H = cfg.num_kv_heads, cfg.head_dim
        cache = self.variable(
            "cache", "attention", decoder.init, B, T, K, H, cfg.dtype, cfg.num_heads
        )
        if self.is_initializing():  # only the cache's shape matters at init
            return jnp.zeros_like(q)
        out, cache.value = decoder.extend(cache.value, q, k, v, position, **gates)
        return out


class CrossAttention(nn.Module):
    """Attention of the decoder's positions [B, T, D] to the encoder's output [B, S, D], through
    the registry (`ModelConfig.cross_attention`), non-causal, without positions. Documents:
    a query sees the keys of an equal id (`segment_ids` of the queries, `encoded_segment_ids`
    of the keys; queries without ids are one document, id 1, reading the source's id 1).
    Decoding projects the keys and values once, at the first step, into the cache (a loop of
    separately compiled steps would project the whole source at each)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, encoded, segment_ids=None, encoded_segment_ids=None, position=None):
        """`position`: the decoder's cache position when decoding (None: not decoding)."""
        cfg = self.config
        q = heads_projection(cfg, cfg.num_heads, "query")(x)  # [B, T, N, H]

        def project(module, encoded):  # keys and values [B, S, K, H]
            del module  # the branch's module (nn.cond): the projections are made in it
            return tuple(heads_projection(cfg, cfg.num_kv_heads, name)(encoded)
                         for name in ("key", "value"))  # fmt: skip

        if position is None or self.is_initializing():
            k, v = project(self, encoded)
            if position is not None:  # the cache's shapes (its values come with the first step)
                for name, value in (("cross_key", k), ("cross_value", v)):
                    self.variable("cache", name, jnp.zeros_like, value)
        else:  # projected at the first step (position 0), then read from the cache
            if not self.has_variable("cache", "cross_key"):
                raise ValueError("decode=True needs a cache (EncoderDecoder's docstring)")
            cache = [self.variable("cache", f"cross_{name}") for name in ("key", "value")]
            made = cache[0].value.shape[:2]
            if made != encoded.shape[:2]:
                raise ValueError(f"the cache was made for a source [B, S] = {made}, not "
                                 f"{encoded.shape[:2]}")  # fmt: skip
            k, v = nn.cond(position == 0, project, cached_keys, self, encoded)
            cache[0].value, cache[1].value = k, v
        ids = {}
        if encoded_segment_ids is not None:
            if segment_ids is None:
                segment_ids = jnp.ones(x.shape[:2], jnp.int32)
            ids = dict(segment_ids=segment_ids, kv_segment_ids=encoded_segment_ids)
        elif segment_ids is not None:
            raise ValueError("targets_segment_ids need inputs_segment_ids (the source's documents)")
        kernel = av.get(cfg.cross_attention, **dict(cfg.cross_attention_options))
        return output_projection(cfg)(kernel(q, k, v, causal=False, **ids))


def cached_keys(module: nn.Module, encoded):
    """The cross-attention's keys and values that the first decoding step left in the cache."""
    del encoded
    return tuple(module.variable("cache", f"cross_{name}").value for name in ("key", "value"))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): silu(x W0) * (x W1) W2."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
        h = nn.silu(dense(cfg.mlp_dim, "gate")(x)) * dense(cfg.mlp_dim, "up")(x)
        return dense(cfg.width, "down")(h)


class Block(nn.Module):
    """x + Attention(Norm(x)), [x + CrossAttention(Norm(x), encoded),] then x + MLP(Norm(x))
    (no MLP when mlp_dim is 0)."""

    config: ModelConfig
    variant: str  # the registry name of the block's attention kernel
    causal: bool = True  # self-attention's direction (False: an encoder's block)
    cross: bool = False  # a decoder's block of an encoder-decoder: cross-attention too

    @nn.compact
    def __call__(
        self,
        x,
        positions,
        segment_ids,
        deterministic: bool,
        decode=False,
        position=None,
        encoded=None,
        encoded_segment_ids=None,
    ):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        attention = Attention(cfg, self.variant, self.causal, name="attention")
        h = make_norm(cfg, "attention_norm")(x)
        x = x + drop(attention(h, positions, segment_ids, decode, position))
        if self.cross:
            h = make_norm(cfg, "cross_attention_norm")(x)
            cross = CrossAttention(cfg, name="cross_attention")
            ids = None if decode else segment_ids
            x = x + drop(cross(h, encoded, ids, encoded_segment_ids, position if decode else None))
        if not cfg.mlp_dim:
            return x
        return x + drop(GatedMLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x)))


def decoding_position(module: nn.Module, decode: bool, segment_ids):
    """The cache's position (a "cache" variable of `module`) when decoding, else None."""
    if not decode:
        return None, None
    if segment_ids is not None:
        raise ValueError("decode=True takes one sequence per row: segment_ids must be None")
    cached = module.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    return cached.value, cached


def embedded(cfg: ModelConfig, embed: nn.Module, tokens, segment_ids, position):
    """Token embeddings plus absolute positions (learned: a "position_embed" table of the
    calling module) -> (x [B, T, D], positions [B, T])."""
    B, T = tokens.shape
    end = T if position is None or isinstance(position, jax.core.Tracer) else position + T
    if end > cfg.max_len and cfg.positions == "learned":
        raise ValueError(f"sequence length {end} exceeds max_len={cfg.max_len}")
    x = embed(tokens)  # [B, T, D]
    positions = jnp.broadcast_to(segment_positions(segment_ids, T), (B, T))
    if position is not None:
        positions = positions + position
    if cfg.positions == "learned":
        table = nn.Embed(cfg.max_len, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="position_embed")  # fmt: skip
        x = x + table(positions)
    elif cfg.positions == "sinusoidal":
        x = x + sinusoidal(positions, cfg.width).astype(x.dtype)
    return x, positions


def blocks(cfg: ModelConfig, x, positions, segment_ids, deterministic, *, layers: int,
           prefix: str = "block", causal: bool = True, decode=False, position=None,
           encoded=None, encoded_segment_ids=None):  # fmt: skip
    """x through `layers` blocks ("{prefix}_{i}" of the calling module), the pattern's
    variants repeated over them."""
    block = nn.remat(Block, static_argnums=(4, 5)) if cfg.remat else Block
    cross = encoded is not None
    for i in range(layers):
        x = block(cfg, cfg.layer_attention(i), causal, cross, name=f"{prefix}_{i}")(
            x, positions, segment_ids, deterministic, decode, position, encoded,
            encoded_segment_ids,
        )  # fmt: skip
    return x


def token_embedding(cfg: ModelConfig, name: str | None = "embed") -> nn.Module:
    return nn.Embed(
        cfg.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


def logits_layer(cfg: ModelConfig, name: str | None = "logits") -> nn.Module | None:
    """The output layer when it is not tied to the token embedding, else None."""
    if cfg.tie_embeddings:
        return None
    return nn.Dense(
        cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
    )


def vocabulary_logits(embed: nn.Module, output: nn.Module | None, x):
    """Normed states [B, T, D] -> float32 logits [B, T, vocab]: through `output`, or tied to
    the token embedding when it is None."""
    return (embed.attend(x) if output is None else output(x)).astype(jnp.float32)


def with_cls(module: nn.Module, cfg: ModelConfig, x, positions, segment_ids):
    """A learned CLS vector (a "cls" parameter) prepended to every row, as Long Range Arena's
    classifiers do: at position 0, in the row's first document. -> (x, positions, ids), T + 1."""
    cls = module.param("cls", nn.initializers.normal(0.02), (cfg.width,), cfg.param_dtype)
    B = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (B, 1, cfg.width)), x], axis=1)
    positions = jnp.pad(positions, ((0, 0), (1, 0)))
    if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
    return x, positions, segment_ids


def pooled(cfg: ModelConfig, x, segment_ids):
    """Normed states [B, T, D] -> one vector per row [B, D]: the mean over the row's real
    tokens (segment id > 0; all of them without ids), or with pooling "cls" the prepended CLS
    position's (`with_cls`)."""
    if cfg.pooling == "cls":
        return x[:, 0]
    real = jnp.ones(x.shape[:2], x.dtype) if segment_ids is None else (segment_ids > 0)
    real = real.astype(jnp.float32)[..., None]  # [B, T, 1]
    total = jnp.sum(x.astype(jnp.float32) * real, axis=1)
    return (total / jnp.maximum(jnp.sum(real, axis=1), 1.0)).astype(x.dtype)


class TransformerLM(nn.Module):
    """Tokens [B, T] (and optional packed `segment_ids` [B, T]) -> logits [B, T, vocab]; with
    `config.num_classes`, a classifier: class logits [B, num_classes] of the pooled states."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens, segment_ids=None, deterministic: bool = True, logits_at=None, decode=False
    ):
        """Logits [B, T, vocab]; with `logits_at` (int [B, K] positions) only at those
        positions, [B, K, vocab] (the output layer is then K/T of its cost). With `decode`,
        the tokens continue the sequence held in the "cache" collection (module docstring)."""
        cfg = self.config
        if decode and (not cfg.causal or cfg.num_classes):
            raise ValueError("decode=True needs a causal language model (causal=True, "
                             "num_classes=0)")  # fmt: skip
        if logits_at is not None and cfg.num_classes:
            raise ValueError("logits_at selects token positions; a classifier (num_classes > 0) "
                             "returns one row of class logits")  # fmt: skip
        position, cached = decoding_position(self, decode, segment_ids)
        embed = token_embedding(cfg)
        x, positions = embedded(cfg, embed, tokens, segment_ids, position)
        if cfg.num_classes and cfg.pooling == "cls":
            x, positions, segment_ids = with_cls(self, cfg, x, positions, segment_ids)
        x = blocks(cfg, x, positions, segment_ids, deterministic, layers=cfg.num_layers,
                   causal=cfg.causal, decode=decode, position=position)  # fmt: skip
        if decode and not self.is_initializing():
            cached.value = position + tokens.shape[1]
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, K, D]
        x = make_norm(cfg, "final_norm")(x)
        if cfg.num_classes:
            head = nn.Dense(cfg.num_classes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            name="classifier")  # fmt: skip
            return head(pooled(cfg, x, segment_ids)).astype(jnp.float32)
        return vocabulary_logits(embed, logits_layer(cfg), x)


def next_token_loss(logits, tokens, segment_ids=None):
    """Mean cross-entropy of predicting tokens[:, t+1] from position t (within a segment)."""
    targets = tokens[:, 1:]
    same = jnp.ones(targets.shape, jnp.float32)
    if segment_ids is not None:
        same = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
    loss_sum, _, weight = weighted_token_stats(logits[:, :-1], targets, same)
    return loss_sum / jnp.maximum(weight, 1.0)


def weighted_token_stats(logits, targets, weights):
    """(sum of w * cross-entropy, sum of w * [argmax == target], sum of w) over the positions
    of `targets` [B, T] with weights `w` [B, T]: the loss counts only what is targeted."""
    weights = weights.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)
