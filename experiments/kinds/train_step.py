"""The `train_step` kind: one TransformerLM training step (forward, cross-entropy, backward,
AdamW update) on random tokens, packed as the cell says."""

from __future__ import annotations

from typing import Any

import jax

from experiments.cells import Built, Cell, cell_model, document_ids, train_step_flops


def build_train_step(cell: Cell, config: Any) -> Built:
    """One TransformerLM training step on random tokens (packed as the cell says): forward,
    next-token cross-entropy, backward and an AdamW update. Nothing is donated, so memory
    counts old and new state."""
    import optax

    from transformer import next_token_loss

    cfg, model = cell_model(cell, cell.seq_len)
    B, T = cell.batch, cell.seq_len
    tokens = jax.random.randint(jax.random.key(config.seed), (B, T), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(config.seed + 1), tokens)["params"]
    optimizer = optax.adamw(config.learning_rate)
    opt_state = jax.jit(optimizer.init)(params)

    def step(params, opt_state, tokens, segment_ids):
        def loss_fn(params):
            logits = model.apply({"params": params}, tokens, segment_ids)
            return next_token_loss(logits, tokens, segment_ids)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    flops = train_step_flops(cell, params, cfg)
    return Built(step, (params, opt_state, tokens, document_ids(cell)), flops, B * T)
