"""The sweep's `train_eval` cell kind: what a variant is worth beside what it costs.

A cell trains a fresh TransformerLM (the sweep's heads, head_dim, dtype and `model.*`, the
cell's attention variant) on a task dataset made for the cell's context length and task fields
(e.g. MQAR with `num_pairs` key-value pairs), then evaluates it on the held-out split. The
runner times one training step and reads its compiled memory like any cell (the cost); the
row also gets `accuracy` and `loss` on the weighted positions, `params` and `train_s` (the
quality). Every cell starts from the same seed, so variants differ only in the attention.
"""

from __future__ import annotations

import time
from typing import Any

import jax
from ml_collections import ConfigDict

from experiments import cells, datasets, train
from experiments.datasets import pipeline


def dataset_config(cell: cells.Cell, config: Any) -> Any:
    """The builder config of the cell's dataset: the sweep's `data.*` fields, the cell's
    length and task fields; named by their hash so that each setting is built once."""
    fields = {**config.data.to_dict(), **dict(cell.task or {}), "seq_len": cell.seq_len}
    name = fields.pop("dataset")
    return name, datasets.config_for(name, **fields)


def training_config(cell: cells.Cell, config: Any) -> ConfigDict:
    """configs/train.py's fields for this cell."""
    from configs import train as base

    c = base.get_config()
    t = config.train
    c.update(dict(num_steps=t.num_steps, learning_rate=t.learning_rate, seed=config.seed))
    c.update(dict(warmup_steps=t.warmup_steps, batch_size=cell.batch, data_dir=t.data_dir))
    c.update(dict(eval_examples=0, eval_every=t.num_steps))
    c.model.update(dict(num_heads=cell.heads, num_kv_heads=cell.kv_heads, head_dim=cell.head_dim))
    c.model.update(dict(dtype=cell.dtype, attention=cell.variant, max_len=cell.seq_len))
    c.model.update(dict(cell.model or {}))
    c.options[cell.variant] = dict(cell.options)
    return c


def build_train_eval(cell: cells.Cell, config: Any) -> cells.Built:
    """The timed call is one training step; `quality()` trains num_steps and evaluates."""
    name, data = dataset_config(cell, config)
    c = training_config(cell, config)
    c.dataset = name
    try:
        setup = train.setup(c, data)
    except cells.ConfigError as e:
        raise ValueError(str(e)) from None
    state = train.init_state(setup)
    train_step, eval_step = train.make_steps(setup)
    batches = pipeline.train_batches(setup.train_source, batch_size=cell.batch, seed=c.seed)
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    cfg = setup.model_config
    flops = cells.train_step_flops(cell, state["params"], cfg.num_layers, cfg.tie_embeddings)
    if setup.targeted:  # the output layer runs at the weighted positions only
        skipped = cell.batch * (cell.seq_len - setup.targeted)
        flops -= 6.0 * cfg.vocab_size * cfg.width * skipped

    def quality() -> dict[str, Any]:
        start = time.perf_counter()
        step = jax.jit(train_step, donate_argnums=0)
        trained = jax.tree.map(lambda x: x.copy(), state)
        for _ in range(c.num_steps):
            trained, _ = step(trained, next(batches))
        metrics = train.evaluate(setup, jax.jit(eval_step), trained["params"])
        seconds = time.perf_counter() - start
        return {"accuracy": metrics["eval/accuracy"], "loss": metrics["eval/loss"],
                "params": params, "train_s": seconds}  # fmt: skip

    first = next(pipeline.train_batches(setup.train_source, batch_size=cell.batch, seed=c.seed))
    return cells.Built(train_step, (state, first), flops, cell.batch * cell.seq_len, quality)
