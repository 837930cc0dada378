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


class Attention(nn.Module):
    """Multi-head attention with GQA; the kernel comes from the registry by name."""

    config: ModelConfig
    variant: str  # the registry name of this layer's kernel

    @nn.compact
    def __call__(self, x, positions, segment_ids, decode: bool = False, position=None):
        cfg = self.config
        dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
            (heads, cfg.head_dim),
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name=name,
        )
        q = dense(cfg.num_heads, "query")(x)  # [B, T, N, H]
        k = dense(cfg.num_kv_heads, "key")(x)  # [B, T, K, H]
        v = dense(cfg.num_kv_heads, "value")(x)  # [B, T, K, H]
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
            out = kernel(q, k, v, causal=True, segment_ids=segment_ids, **gates)  # [B, T, N, H]
        if layer.norm or layer.output_gate or layer.skip:
            out = mixers.OutputGate(layer.norm, layer.output_gate, layer.skip, cfg.dtype,
                                    cfg.param_dtype, name="output")(out, x, v)  # fmt: skip
        return nn.DenseGeneral(
            cfg.width,
            axis=(-2, -1),
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="out",
        )(out)

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
    """x + Attention(Norm(x)), then x + MLP(Norm(x)) (no MLP when mlp_dim is 0)."""

    config: ModelConfig
    variant: str  # the registry name of the block's attention kernel

    @nn.compact
    def __call__(self, x, positions, segment_ids, deterministic: bool, decode=False, position=None):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)
        attention = Attention(cfg, self.variant, name="attention")
        h = make_norm(cfg, "attention_norm")(x)
        x = x + drop(attention(h, positions, segment_ids, decode, position))
        if not cfg.mlp_dim:
            return x
        return x + drop(GatedMLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x)))


class TransformerLM(nn.Module):
    """Tokens [B, T] (and optional packed `segment_ids` [B, T]) -> logits [B, T, vocab]."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens, segment_ids=None, deterministic: bool = True, logits_at=None, decode=False
    ):
        """Logits [B, T, vocab]; with `logits_at` (int [B, K] positions) only at those
        positions, [B, K, vocab] (the output layer is then K/T of its cost). With `decode`,
        the tokens continue the sequence held in the "cache" collection (module docstring)."""
        cfg = self.config
        B, T = tokens.shape
        position = None
        if decode:
            if segment_ids is not None:
                raise ValueError("decode=True takes one sequence per row: segment_ids must be None")
            cached = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            position = cached.value
        end = T if position is None or isinstance(position, jax.core.Tracer) else position + T
        if end > cfg.max_len and cfg.positions == "learned":
            raise ValueError(f"sequence length {end} exceeds max_len={cfg.max_len}")
        embed = nn.Embed(
            cfg.vocab_size, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="embed"
        )
        x = embed(tokens)  # [B, T, D]
        positions = jnp.broadcast_to(segment_positions(segment_ids, T), (B, T))
        if decode:
            positions = positions + position
        if cfg.positions == "learned":
            x = x + nn.Embed(
                cfg.max_len,
                cfg.width,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="position_embed",
            )(positions)
        elif cfg.positions == "sinusoidal":
            x = x + sinusoidal(positions, cfg.width).astype(x.dtype)
        block = nn.remat(Block, static_argnums=(4, 5)) if cfg.remat else Block
        for i in range(cfg.num_layers):
            x = block(cfg, cfg.layer_attention(i), name=f"block_{i}")(
                x, positions, segment_ids, deterministic, decode, position
            )
        if decode and not self.is_initializing():
            cached.value = position + T
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, K, D]
        x = make_norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="logits",
            )(x)
        return logits.astype(jnp.float32)


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
