"""ModelConfig: every field of the Transformer, validated once, built from a config section."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import attention_variants as av

POOLINGS = ("mean", "cls")
POSITIONS = ("rope", "learned", "sinusoidal", "none")
NORMS = ("rms", "layer")
DTYPES = ("float32", "bfloat16", "float16")


def as_dict(options) -> dict[str, Any]:
    """A mapping, a ConfigDict or (name, value) pairs, as a dict."""
    if hasattr(options, "to_dict"):
        return options.to_dict()
    return dict(options)


def frozen(options) -> tuple:
    """Options as sorted (name, value) pairs with list values (as JSON gives back a window
    pair) made tuples: hashable, so the config can be a static argument of jit."""
    tupled = lambda v: tuple(map(tupled, v)) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return tuple(sorted((name, tupled(value)) for name, value in as_dict(options).items()))


def layer_pattern(attention) -> tuple[str, ...]:
    """`ModelConfig.attention` as a tuple of registry names, one per layer of the pattern."""
    parts = attention.replace("+", ",").split(",") if isinstance(attention, str) else attention
    if isinstance(parts, str) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"attention must be a registry name or a sequence of them, got "
                         f"{attention!r}")  # fmt: skip
    names = []
    for part in parts:
        name, _, times = part.strip().partition("*")
        if times and not (times.isdigit() and int(times) > 0):
            raise ValueError(f"attention: {part!r} must be name*n with n a positive int")
        names += [name.strip()] * (int(times) if times else 1)
    if not names or "" in names:
        raise ValueError(f"attention names no variant in {attention!r}")
    return tuple(names)


def pattern_name(pattern: tuple[str, ...] | list[str]) -> str:
    """A layer pattern as written on the command line, repeats folded: sliding_window*3+dense."""
    runs = [(name, len(list(run))) for name, run in itertools.groupby(pattern)]
    return "+".join(name if n == 1 else f"{name}*{n}" for name, n in runs)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Transformer: a decoder-only language model, a bidirectional encoder (`causal=False`), a
    classifier (`num_classes > 0`), or the two towers of `EncoderDecoder`. `attention` names
    the kernel; nothing else varies.

    `attention` is a registry name, or a hybrid's layer pattern repeated over the layers: a
    sequence of names, or one string of names joined by "," or "+", where "name*n" repeats a
    name n times ("sliding_window*3+dense": three local layers, then a global one).
    `attention_options` are the kernel's options; for a hybrid, a mapping from each name to its
    options (names left out take their defaults).
    """

    vocab_size: int = 256  # token ids are in [0, vocab_size)
    num_layers: int = 2  # pre-norm Transformer blocks
    num_heads: int = 4  # query heads N
    num_kv_heads: int = 4  # key/value heads K (N % K == 0; K < N is GQA, K == 1 is MQA)
    head_dim: int = 32  # H
    mlp_dim: int = 256  # hidden width of the gated MLP; 0: attention-only blocks (no MLP)
    max_len: int = 2048  # longest sequence (learned positions; RoPE needs no table)
    attention: Any = "dense"  # registry name of the kernel, or a hybrid's pattern (docstring)
    attention_options: Any = ()  # options bound to the kernel (a mapping; stored sorted)
    positions: str = "rope"  # "rope" | "learned" | "sinusoidal" (Vaswani et al. 2017) | "none"
    norm: str = "rms"  # "rms" (RMSNorm) | "layer" (LayerNorm, the original Transformer's)
    embed_dim: int | None = None  # model width D; None means num_heads * head_dim
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # parameter dtype
    dropout_rate: float = 0.0  # dropout after attention and MLP (training only)
    remat: bool = False  # rematerialise each block in the backward pass (saves memory)
    tie_embeddings: bool = True  # output logits use the input embedding matrix
    rope_base: float = 10_000.0  # RoPE wavelength base
    # The variant's own layer around its kernel (`attention_variants.Layer`: short convolution,
    # gates, output norm and gate, as its paper); False: the plain projections for every variant
    # (gated kernels then run without gates: no decay, beta = 1).
    variant_layer: bool = True
    # A learned sink logit per head and layer in the softmax's denominator (gpt-oss), for the
    # variants that take `sink_logits` (masked softmax; others ignore it).
    attention_sinks: bool = False
    # False: bidirectional self-attention (an encoder); every variant runs its non-causal form.
    causal: bool = True
    # > 0: a classifier: the final states pooled per row (`pooling`), then class logits.
    num_classes: int = 0
    # "mean" over each row's real tokens (segment id > 0) | "cls": a learned CLS vector
    # prepended to each row (Long Range Arena's); local patterns see it only near the start.
    pooling: str = "mean"
    # EncoderDecoder (which ignores `causal`): the encoder's blocks (None: num_layers; the
    # decoder has num_layers), the encoder's self-attention with its options (None: the
    # decoder's `attention` and options), the decoder's cross-attention with its options.
    num_encoder_layers: int | None = None
    encoder_attention: Any = None
    encoder_attention_options: Any = ()
    cross_attention: str = "dense"
    cross_attention_options: Any = ()

    def __post_init__(self):
        pattern = layer_pattern(self.attention)
        object.__setattr__(self, "attention", pattern[0] if len(pattern) == 1 else pattern)
        options = as_dict(self.attention_options)
        if len(pattern) > 1:  # one mapping of options per name
            unknown = sorted(set(options) - set(pattern))
            if unknown:
                raise ValueError(
                    f"attention_options of a hybrid map its variants {sorted(set(pattern))} to "
                    f"their options; {unknown} is not among them"
                )
            options = {name: frozen(o) for name, o in options.items()}
        object.__setattr__(self, "attention_options", frozen(options))
        for name in self.variants:  # unknown name or option: clear error now
            av.spec(name).options(**self.options_of(name))
        if not self.causal:
            self.check_bidirectional("causal=False")
        cross = as_dict(self.cross_attention_options)
        object.__setattr__(self, "cross_attention_options", frozen(cross))
        av.spec(self.cross_attention).options(**cross)
        if av.spec(self.cross_attention).causal_only:
            raise ValueError(
                f"cross_attention={self.cross_attention!r} serves only causal self-attention; "
                "cross-attention needs a variant with a non-causal form (dense, blockwise, ...)"
            )
        if self.encoder_attention is None:
            if as_dict(self.encoder_attention_options):
                raise ValueError("encoder_attention_options need an encoder_attention")
            object.__setattr__(self, "encoder_attention_options", ())
        else:  # unknown name or option: clear error now; the options stored as attention's
            options = self.encoder().attention_options
            object.__setattr__(self, "encoder_attention_options", options)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.num_classes and self.pooling == "cls" and self.causal:
            raise ValueError("pooling='cls' needs causal=False: a causal CLS position at the "
                             "row's start sees nothing else (use pooling='mean')")  # fmt: skip
        for name in (
            "vocab_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if len(self.pattern) > self.num_layers:
            raise ValueError(
                f"attention's pattern of {len(self.pattern)} layers {self.pattern} is longer "
                f"than num_layers={self.num_layers}"
            )
        for name in ("mlp_dim", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an int >= 0, got {value!r}")
        if self.num_encoder_layers is not None and (
            not isinstance(self.num_encoder_layers, int) or self.num_encoder_layers <= 0
        ):
            raise ValueError(f"ModelConfig.num_encoder_layers must be None or a positive int, "
                             f"got {self.num_encoder_layers!r}")  # fmt: skip
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.embed_dim is not None and (
            not isinstance(self.embed_dim, int)
            or isinstance(self.embed_dim, bool)
            or self.embed_dim <= 0
        ):
            raise ValueError(
                f"ModelConfig.embed_dim must be None or a positive int, got {self.embed_dim!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got head_dim={self.head_dim}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def width(self) -> int:
        """Model width D."""
        return self.embed_dim or self.num_heads * self.head_dim

    @property
    def pattern(self) -> tuple[str, ...]:
        """The variant names of the layer pattern (one for a model of one kernel)."""
        return (self.attention,) if isinstance(self.attention, str) else self.attention

    @property
    def attention_name(self) -> str:
        """The pattern as written on the command line ("sliding_window*3+dense")."""
        return pattern_name(self.pattern)

    @property
    def variants(self) -> tuple[str, ...]:
        """The distinct variants of the pattern, in order of first use."""
        return tuple(dict.fromkeys(self.pattern))

    def layer_attention(self, layer: int) -> str:
        """The variant of block `layer` (the pattern repeated over the layers)."""
        return self.pattern[layer % len(self.pattern)]

    @property
    def encoder_layers(self) -> int:
        """The encoder's blocks in an EncoderDecoder."""
        return self.num_encoder_layers or self.num_layers

    def encoder(self) -> ModelConfig:
        """The config of an EncoderDecoder's encoder: bidirectional, `encoder_attention`."""
        if self.encoder_attention is None:
            self.check_bidirectional("the encoder (encoder_attention=None: attention)")
            return self.replace(causal=False, num_layers=self.encoder_layers)
        encoder = self.replace(
            attention=self.encoder_attention,
            attention_options=self.encoder_attention_options,
            num_layers=self.encoder_layers,
            encoder_attention=None,
            encoder_attention_options=(),
        )
        encoder.check_bidirectional("encoder_attention")
        return encoder.replace(causal=False)

    def check_bidirectional(self, use: str) -> None:
        """Raises ValueError naming the pattern's variants that serve only causal calls."""
        causal_only = [name for name in self.variants if av.spec(name).causal_only]
        if causal_only:
            raise ValueError(
                f"{use} needs bidirectional attention; {', '.join(map(repr, causal_only))} "
                "serve(s) only causal calls (recurrent or block-selection variants)"
            )

    def options_of(self, name: str) -> dict[str, Any]:
        """The options bound to variant `name`'s kernel."""
        if isinstance(self.attention, str):
            return dict(self.attention_options) if name == self.attention else {}
        return dict(dict(self.attention_options).get(name, ()))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
