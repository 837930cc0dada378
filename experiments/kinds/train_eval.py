"""The `train_eval` kind: what a variant is worth beside what it costs.

A cell trains a fresh TransformerLM (the sweep's heads, head_dim, dtype and `model.*`, the
cell's attention variant, seed and learning rate) on a task dataset made for the cell's context
length and task fields (e.g. MQAR with `num_pairs` key-value pairs; ListOps' classification
rows with their `min_len`, `max_len`: then the model is the encoder classifier that `model.*`
makes, with `model.causal=False`, and accuracy counts rows) with the real training loop
(`experiments.train.train_and_evaluate`: the config's `train.*` fields, evaluation every
`train.eval_every` steps, early stop at `train.threshold`), into its own run folder under the
sweep's workdir (metrics, checkpoints: a killed sweep resumes the cell's training). The runner
times one training step and reads its compiled memory like any cell (the cost); the row also
gets the final `accuracy` and `loss`, `eval_curve`, `steps_to_threshold`, `converged`,
`trained_steps`, `params` and `train_s` (the quality), and with `extrapolate` factors (e.g.
"2,4") `extrapolation`: {length: accuracy} of the trained model on test rows built at those
multiples of the length (experiments.evaluate: Zoology's `ar_extrapolate`, more pairs in
longer rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, TextIO

from ml_collections import ConfigDict

from experiments import datasets, evaluate, provenance, train
from experiments.cells import Built, Cell, train_step_flops, variant_options
from experiments.configlib import ConfigError


def dataset_config(cell: Cell, config: Any) -> tuple[str, Any]:
    """The builder config of the cell's dataset: the sweep's `data.*` fields, the cell's
    length and task fields; named by their hash so that each setting is built once."""
    fields = {**config.data.to_dict(), **dict(cell.task or {}), "seq_len": cell.seq_len}
    name = fields.pop("dataset")
    return name, datasets.config_for(name, **fields)


def training_config(cell: Cell, config: Any) -> ConfigDict:
    """The sweep's `train.*` section (configs/train.py's fields) set for this cell."""
    c = ConfigDict(config.train.to_dict())
    c.update(dict(seed=cell.seed, learning_rate=cell.learning_rate, batch_size=cell.batch))
    c.model.update(dict(num_heads=cell.heads, num_kv_heads=cell.kv_heads, head_dim=cell.head_dim))
    c.model.update(dict(dtype=cell.dtype, attention=cell.variant, max_len=cell.seq_len))
    c.model.update(dict(cell.model or {}))
    for name, options in variant_options(cell).items():  # a hybrid's, each variant's
        c.options[name] = options
    return c


def run_name(cell: Cell) -> str:
    """The cell's run folder: readable, and unique per cell and code version (a cell measured
    again by other code trains afresh; the old run stays)."""
    task = "".join(f"_{k}{v}" for k, v in (cell.task or {}).items())
    versions = provenance.versions()
    digest = hashlib.sha1((cell.key() + str(sorted(versions.items()))).encode()).hexdigest()
    return (
        f"{cell.variant}_T{cell.seq_len}{task}_lr{cell.learning_rate:g}_s{cell.seed}_{digest[:8]}"
    )


def build_train_eval(cell: Cell, config: Any) -> Built:
    """The timed call is one training step; `quality(workdir, out)` trains into
    workdir/runs/<run_name> and returns the row's quality fields."""
    name, data = dataset_config(cell, config)
    c = training_config(cell, config)
    c.dataset = name
    try:
        setup = train.setup(c, data)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if setup.seq2seq:
        raise ValueError(f"{name} is a sequence-to-sequence task: train_eval cells train one "
                         "tower (a language model, an encoder or a classifier)")  # fmt: skip
    state = train.init_state(setup)
    train_step, _ = train.make_steps(setup)
    cfg = setup.model_config
    measured = dataclasses.replace(cell, head_dim=cfg.head_dim)  # a budget may set head_dim
    flops = train_step_flops(measured, state["params"], cfg)
    if setup.targeted:  # the output layer runs at the weighted positions only
        skipped = cell.batch * (cell.seq_len - setup.targeted)
        flops -= 6.0 * cfg.vocab_size * cfg.width * skipped

    def quality(workdir: Path, out: TextIO) -> dict[str, Any]:
        run = workdir / "runs" / run_name(cell)
        result = train.train_and_evaluate(c, run, out=out, prepared=setup)
        metrics = result["metrics"]
        lengths = [cell.seq_len * f for f in (cell.training or {}).get("extrapolate", [])]
        extrapolation: dict[str, float | None] = {}
        for length in lengths:  # the test split built at each longer length, more pairs in it
            beyond = evaluate.Args([length], max_examples=config.data.num_test)
            try:
                (row,) = evaluate.evaluate(run, beyond, out)
                extrapolation[str(length)] = row["accuracy"]
            except evaluate.CannotEvaluate as e:  # e.g. MQAR needs vocab > length: no data
                print(f"no extrapolation to {length}: {e}", file=out)
                extrapolation[str(length)] = None
        return {
            "accuracy": metrics["eval/accuracy"],
            "loss": metrics["eval/loss"],
            "eval_curve": result["eval_curve"],
            "steps_to_threshold": result["steps_to_threshold"],
            "converged": result["converged"],
            "trained_steps": result["step"],
            "params": result["params"],
            "train_s": result.get("train_s"),
            **({"extrapolation": extrapolation} if lengths else {}),
            **(
                {"matched": {c.match_field: getattr(cfg, c.match_field)}}
                if c.get("match_params")
                else {}
            ),  # fmt: skip
        }

    first = next(train.pipeline.train_batches(setup.train_source, batch_size=cell.batch,
                                              seed=c.seed))  # fmt: skip
    return Built(train_step, (state, first), flops, cell.batch * cell.seq_len, quality)
