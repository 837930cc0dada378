"""EncoderDecoder: the original Transformer's two towers (Vaswani et al. 2017), kernels by name.

The encoder reads `inputs` [B, S] with bidirectional self-attention (the non-causal form
of `config.encoder_attention`, default `config.attention`); the decoder writes `targets`
[B, T] with causal self-attention, then cross-attention to the encoder's output through
the registry (`config.cross_attention`, default `dense`), then the MLP. One token embedding
serves both towers and, with `tie_embeddings` (the default), the output logits. As in flax's
WMT example:

    logits = model.apply({"params": p}, inputs, targets)           # [B, T, vocab]
    encoded = model.apply({"params": p}, inputs, method="encode")  # [B, S, D]
    logits = model.apply({"params": p}, encoded, inputs, targets, method="decode")

The decoder reads the targets shifted right (0 first: the start token, per document of a
packed row), so logits[:, t] predict targets[:, t]. Decoding: the cache comes from
`init(rng, inputs, zeros [B, max_len], decode=True)["cache"]`; then
`apply({"params": p, "cache": c}, encoded, inputs, chunk, decode=True, mutable=["cache"],
method="decode")` appends a chunk of decoder tokens (not shifted: the caller feeds the start
token, then what came out) and returns their logits. The cache also keeps each block's
cross-attention keys and values, projected from `encoded` at the first step and read after it
(so every step of one cache must get the same `encoded`; a new source needs a new cache).

Documents: `inputs_segment_ids` [B, S] mark the source's documents (0 on padding, which no
target reads), `targets_segment_ids` [B, T] the targets'; a target position reads the source
document of its id (without target ids, every target reads the source's document 1). Without
any ids every position is a real token of one document.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer.config import ModelConfig
from transformer.model import (
    blocks,
    decoding_position,
    embedded,
    logits_layer,
    make_norm,
    segment_positions,
    token_embedding,
    vocabulary_logits,
)


def shift_right(targets, segment_ids=None):
    """The decoder's inputs: targets moved one position right, 0 (the start token) at the
    first position of each row and, with segment ids, of each document."""
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    if segment_ids is None:
        return shifted
    first = segment_positions(segment_ids, targets.shape[1]) == 0
    return jnp.where(first, 0, shifted)


class Tower(nn.Module):
    """Tokens through the shared embedding, positions and blocks to normed states [B, T, D]:
    the encoder (`causal=False`) or the decoder (`cross=True`: attends to `encoded` too)."""

    config: ModelConfig
    embed: nn.Module
    layers: int
    causal: bool
    cross: bool = False

    @nn.compact
    def __call__(self, tokens, segment_ids, deterministic, decode=False, encoded=None,
                 encoded_segment_ids=None):  # fmt: skip
        cfg = self.config
        position, cached = decoding_position(self, decode, segment_ids)
        x, positions = embedded(cfg, self.embed, tokens, segment_ids, position)
        x = blocks(cfg, x, positions, segment_ids, deterministic, layers=self.layers,
                   causal=self.causal, decode=decode, position=position, encoded=encoded,
                   encoded_segment_ids=encoded_segment_ids)  # fmt: skip
        if decode and not self.is_initializing():
            cached.value = position + tokens.shape[1]
        return make_norm(cfg, "final_norm")(x)


class EncoderDecoder(nn.Module):
    """inputs [B, S], targets [B, T] -> target logits [B, T, vocab] (module docstring)."""

    config: ModelConfig

    def __post_init__(self):
        self.config.encoder()  # a causal-only encoder variant raises now, naming it
        if self.config.num_classes:
            raise ValueError("an EncoderDecoder writes tokens: num_classes must be 0")
        super().__post_init__()

    def setup(self):
        cfg = self.config
        self.embed = token_embedding(cfg, name=None)
        self.output = logits_layer(cfg, name=None)
        self.encoder = Tower(cfg.encoder(), self.embed, cfg.encoder_layers, causal=False)
        self.decoder = Tower(cfg, self.embed, cfg.num_layers, causal=True, cross=True)

    def __call__(self, inputs, targets, inputs_segment_ids=None, targets_segment_ids=None,
                 deterministic: bool = True, decode: bool = False):  # fmt: skip
        encoded = self.encode(inputs, inputs_segment_ids, deterministic)
        return self.decode(encoded, inputs, targets, inputs_segment_ids, targets_segment_ids,
                           decode=decode, deterministic=deterministic)  # fmt: skip

    def encode(self, inputs, inputs_segment_ids=None, deterministic: bool = True):
        """The encoder's output [B, S, D]."""
        return self.encoder(inputs, inputs_segment_ids, deterministic)

    def decode(self, encoded, inputs, targets, inputs_segment_ids=None, targets_segment_ids=None,
               *, decode: bool = False, deterministic: bool = True):  # fmt: skip
        """Target logits [B, T, vocab] given the encoder's output; `inputs` [B, S] are the
        source tokens that `encoded` came from (their shape is checked)."""
        if inputs.shape[:2] != encoded.shape[:2]:
            raise ValueError(f"inputs {inputs.shape} and encoded {encoded.shape} differ in [B, S]")
        tokens = targets if decode else shift_right(targets, targets_segment_ids)
        x = self.decoder(tokens, targets_segment_ids, deterministic, decode, encoded,
                         inputs_segment_ids)  # fmt: skip
        return vocabulary_logits(self.embed, self.output, x)
