"""The functional Flax Transformer core; it knows attention kernels only by registry name."""

from transformer.config import ModelConfig
from transformer.encoder_decoder import EncoderDecoder
from transformer.model import TransformerLM, next_token_loss
from transformer.sampling import generate, sample_logits

__all__ = [
    "EncoderDecoder",
    "ModelConfig",
    "TransformerLM",
    "generate",
    "next_token_loss",
    "sample_logits",
]
