"""ModelConfig: every field of the Transformer, validated once, built from a config section."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import attention_variants as av

POSITIONS = ("rope", "learned", "sinusoidal", "none")
NORMS = ("rms", "layer")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model. `attention` is a registry name; nothing else varies."""

    vocab_size: int = 256  # token ids are in [0, vocab_size)
    num_layers: int = 2  # pre-norm Transformer blocks
    num_heads: int = 4  # query heads N
    num_kv_heads: int = 4  # key/value heads K (N % K == 0; K < N is GQA, K == 1 is MQA)
    head_dim: int = 32  # H
    mlp_dim: int = 256  # hidden width of the gated MLP; 0: attention-only blocks (no MLP)
    max_len: int = 2048  # longest sequence (learned positions; RoPE needs no table)
    attention: str = "dense"  # registry name of the attention kernel
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

    def __post_init__(self):
        options = self.attention_options
        if isinstance(options, Mapping) or hasattr(options, "to_dict"):
            options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
        else:
            options = dict(options)
        object.__setattr__(self, "attention_options", tuple(sorted(options.items())))
        av.spec(self.attention).options(**options)  # unknown name or option: clear error now
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
        if not isinstance(self.mlp_dim, int) or isinstance(self.mlp_dim, bool) or self.mlp_dim < 0:
            raise ValueError(f"ModelConfig.mlp_dim must be an int >= 0, got {self.mlp_dim!r}")
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
    def kernel_options(self) -> dict[str, Any]:
        return dict(self.attention_options)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)
