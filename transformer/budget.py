"""Parameter budgets: a variant's own layer (short convolutions, gates, output norms) brings
parameters that softmax attention does not have, so a fair ablation may hold the parameter
count fixed instead of the width.

    parameter_count(cfg)                             # 76,040 for gated_deltanet, say
    matched(cfg, budget=65_728, field="head_dim")    # cfg with the head_dim that comes closest

Counts come from the model's parameter shapes (`jax.eval_shape`: nothing is computed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer.config import ModelConfig
from transformer.encoder_decoder import EncoderDecoder
from transformer.model import TransformerLM

MATCH_FIELDS = ("head_dim", "mlp_dim")  # the widths `matched` may set


def parameter_count(config: ModelConfig, encoder_decoder: bool = False) -> int:
    """Parameters of the TransformerLM (or EncoderDecoder) that `config` builds."""
    model = (EncoderDecoder if encoder_decoder else TransformerLM)(config)
    tokens = jnp.zeros((1, config.max_len), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *[tokens] * (1 + encoder_decoder))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def matched(
    config: ModelConfig, budget: int, field: str = "head_dim", encoder_decoder: bool = False
) -> ModelConfig:
    """`config` with `field` (a width of MATCH_FIELDS) set to the value whose parameter count
    is closest to `budget` (the smaller on a tie; even head_dim with RoPE). The count grows
    with the width, so a bisection finds it in a few traces. ValueError for a field that is
    not a width or a budget below the smallest model."""
    if field not in MATCH_FIELDS:
        raise ValueError(f"a parameter budget sets one of {MATCH_FIELDS}, not {field!r}")
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"a parameter budget must be a positive int, got {budget!r}")
    step = 2 if field == "head_dim" and config.positions == "rope" else 1
    least = step if field == "head_dim" else 0

    @functools.cache
    def count(width: int) -> int:
        return parameter_count(config.replace(**{field: width}), encoder_decoder)

    if count(least) > budget:
        raise ValueError(f"{config.attention_name} has {count(least):,} parameters at "
                         f"{field}={least}, more than the budget of {budget:,}")  # fmt: skip
    low, high = least, least + step  # count(low) <= budget; grow high until count > budget
    while count(high) <= budget:
        low, high = high, high + 2 * (high - least)
    while high - low > step:  # invariant: count(low) <= budget < count(high)
        middle = low + (high - low) // (2 * step) * step
        low, high = (middle, high) if count(middle) <= budget else (low, middle)
    best = min((low, high), key=lambda width: (abs(count(width) - budget), width))
    return config.replace(**{field: best})
