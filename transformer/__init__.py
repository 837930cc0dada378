"""The functional Flax Transformer core; it knows attention kernels only by registry name."""

from transformer.config import ModelConfig
from transformer.model import TransformerLM, next_token_loss

__all__ = ["ModelConfig", "TransformerLM", "next_token_loss"]
