"""The TransformerLM training step per context length and attention variant: tokens/s, memory.

    python -m experiments.sweep --config=configs/model_sweep.py

An edit of configs/context_sweep.py: each cell is one jitted training step (forward,
next-token cross-entropy, backward, optax AdamW update) of a small model on random tokens, so
the attention kernel is the only thing that changes between rows. Repeats and caps as in the
base config; about 5 minutes on a 2-core CPU with the variants of today.
"""

import ml_collections

from configs import context_sweep


def get_config():
    c = context_sweep.get_config()
    c.kind = "train_step"  # one training step per call
    c.modes = "train_step"  # the only mode of this kind
    c.baselines = "dense,blockwise"  # the vanilla Transformer first
    c.lengths = "256,512,1024,2048,4096"  # context lengths T
    c.batch = 1  # sequences per step
    c.heads = 4  # N
    c.kv_heads = 4  # K
    c.head_dim = 64  # H (width D = N * H = 256)
    c.learning_rate = 1e-3  # AdamW learning rate (the value does not change the timing)
    c.model = ml_collections.ConfigDict()  # the rest of transformer.ModelConfig
    c.model.vocab_size = 256  # byte-level vocabulary
    c.model.num_layers = 2  # Transformer blocks
    c.model.mlp_dim = 1024  # gated MLP width
    c.model.positions = "rope"  # "rope" | "learned" | "none"
    c.model.param_dtype = "float32"  # parameters and optimizer state
    c.model.remat = False  # rematerialise blocks in the backward pass
    c.time_budget_s = 420.0  # whole-sweep budget (s)
    return c
