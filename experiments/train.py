"""Train the TransformerLM on a project dataset, one attention variant swapped, the rest equal.

    python -m experiments.train --config=configs/mqar.py --workdir=runs/mqar \
        [--config.model.attention=linear] [--config.num_steps=2000] [--stop_after=100]

The dataset (a TFDS name with its config, e.g. `mqar/small`) is built on first use into
`data_dir`. The loss is the cross-entropy on the rows' weighted positions only (MQAR's
queries, ListOps' answer, every real token of text). AdamW with linear warmup and cosine decay,
global-norm clipping, a jitted step with the state donated. The workdir receives:

    config.json        the resolved config, with the model's parameter count
    checkpoints/<step> orbax: item `state` (params, opt_state, step, rng; StandardSave, so plain
                       orbax restores it) and item `data` (the grain iterator's position)
    metrics.csv        step,tag,value rows: train/loss, train/learning_rate, train/tokens_per_s,
                       eval/loss, eval/accuracy (text also eval/perplexity, eval/bits_per_token)
    events.out.tfevents.*  the same scalars for TensorBoard

A rerun of the same command resumes from the newest readable checkpoint, with the data position
and the rng, so a stopped and resumed run ends with the parameters of an uninterrupted one
(rows logged after the last checkpoint are logged again; a changed num_steps or learning rate
resumes with the new schedule). An unreadable newest checkpoint is moved to `corrupt/` with a
warning and the one before it is used. SIGTERM or Ctrl-C saves a checkpoint, then exits (143 or
130). A workdir trained with another model or data stream (model.*, RESUME_FIELDS) is refused,
naming the fields. Exit 2 for an invalid config.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import datasets, distributed
from experiments.cells import ConfigError, float_field, int_field, parse_flags
from experiments.datasets import pipeline
from transformer import ModelConfig, TransformerLM
from transformer.model import weighted_token_stats

SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


class WorkdirMismatch(ValueError):
    """The workdir holds a run of another model config."""


@dataclasses.dataclass
class Setup:
    """What a config resolves to: the model, its optimizer and the data sources."""

    config: Any
    model_config: ModelConfig
    train_source: Any
    eval_source: Any
    seq_len: int | None  # packed row length of a text dataset, else None (task rows)
    targeted: int | None = None  # most weighted positions in a task row (logits only there)

    @property
    def text(self) -> bool:
        return self.seq_len is not None

    @property
    def model(self) -> TransformerLM:
        return TransformerLM(self.model_config)

    def optimizer(self) -> optax.GradientTransformation:
        c = self.config
        schedule = self.schedule()
        adamw = optax.adamw(schedule, weight_decay=c.weight_decay)
        return optax.chain(optax.clip_by_global_norm(c.grad_clip), adamw) if c.grad_clip else adamw

    def schedule(self) -> optax.Schedule:
        c = self.config
        return optax.warmup_cosine_decay_schedule(
            0.0, c.learning_rate, c.warmup_steps, max(c.num_steps, c.warmup_steps + 1)
        )


def _check(config: Any) -> None:
    for name in ("num_steps", "batch_size", "eval_every", "log_every", "checkpoint_every", "keep"):
        int_field(config, name)
    for name in ("warmup_steps", "seq_len", "eval_examples", "seed"):
        int_field(config, name, 0)
    if config.warmup_steps >= config.num_steps:
        raise ConfigError("warmup_steps", f"must be < num_steps={config.num_steps}")
    for name in ("learning_rate", "weight_decay", "grad_clip"):
        float_field(config, name, strict=False)


def setup(config: Any, dataset_config: Any = None) -> Setup:
    """Validates `config` (ConfigError naming the field), builds the dataset when missing
    (`config.dataset` names it; `dataset_config`, a builder config, may set it instead)."""
    _check(config)
    try:
        builder = datasets.prepare(config.dataset, config.data_dir or None, dataset_config)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        raise ConfigError("dataset", str(e)) from None
    splits = builder.as_data_source()
    if config.eval_split not in splits or "train" not in splits:
        raise ConfigError("eval_split", f"{config.dataset} has splits {sorted(splits)}")
    train_source, eval_source = splits["train"], splits[config.eval_split]
    if config.eval_examples:
        eval_source = [eval_source[i] for i in range(min(config.eval_examples, len(eval_source)))]
    text = pipeline.is_text(train_source)
    fields = config.model.to_dict()
    row = None if text else len(train_source[0]["inputs"])
    seq_len = config.seq_len or fields["max_len"] or row
    if seq_len is None:
        raise ConfigError("seq_len", "a text dataset needs seq_len or model.max_len")
    fields["vocab_size"] = fields["vocab_size"] or builder.builder_config.vocab_size()
    fields["max_len"] = fields["max_len"] or seq_len
    fields["attention_options"] = dict(config.options.get(fields["attention"]) or {})
    try:
        model_config = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError("model", str(e)) from None
    targeted = None
    if not text:  # MQAR's N queries, ListOps' one answer: the logits are needed only there
        most = builder.builder_config.max_targets()
        targeted = most if 2 * most <= row else None
    text_len = seq_len if text else None
    return Setup(config, model_config, train_source, eval_source, text_len, targeted)


def init_state(setup: Setup) -> dict[str, Any]:
    """params, optimizer state, step and rng (raw key data), all plain arrays."""
    key = jax.random.key(setup.config.seed)
    tokens = jnp.zeros((1, setup.model_config.max_len), jnp.int32)
    params = setup.model.init(key, tokens)["params"]
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    opt_state = setup.optimizer().init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(0), "rng": rng}


def make_steps(setup: Setup):
    """The train step (state, batch) -> (state, metrics) and the eval step (params, batch) ->
    weighted sums; not jitted (the caller jits, donating the state where it can)."""
    model, optimizer, schedule = setup.model, setup.optimizer(), setup.schedule()

    def stats(params, batch, **kwargs):
        """Weighted loss sums; with `setup.targeted`, logits only at the weighted positions
        (the same sums: every weighted position of a row is among its top `targeted`)."""
        targets, weights, at = batch["targets"], batch["weights"], None
        if setup.targeted:
            at = jnp.argsort(weights, axis=1, descending=True)[:, : setup.targeted]
            targets, weights = (jnp.take_along_axis(x, at, axis=1) for x in (targets, weights))
        inputs, segment_ids = batch["inputs"], batch.get("segment_ids")
        logits = model.apply({"params": params}, inputs, segment_ids, logits_at=at, **kwargs)
        return weighted_token_stats(logits, targets, weights)

    def loss_fn(params, batch, rng):
        loss_sum, correct, weight = stats(params, batch, deterministic=False, rngs={"dropout": rng})
        return loss_sum / jnp.maximum(weight, 1.0), correct / jnp.maximum(weight, 1.0)

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, rng
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "accuracy": accuracy, "learning_rate": schedule(state["step"])}
        new = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new, metrics

    def eval_step(params, batch):
        return stats(params, batch)

    return train_step, eval_step


def evaluate(setup: Setup, eval_step, params, mesh=None) -> dict[str, float]:
    """Loss and accuracy over the weighted positions of the held-out split (batches split over
    `mesh` when one is given)."""
    c = setup.config
    totals = np.zeros(3)
    for batch in pipeline.eval_batches(
        setup.eval_source, batch_size=c.batch_size, seq_len=setup.seq_len
    ):
        if mesh is not None:
            batch = distributed.pad_rows(batch, mesh.shape["data"])
            batch = distributed.place_batch(mesh, batch)
        totals += [float(x) for x in eval_step(params, batch)]
    loss_sum, correct, weight = totals
    metrics = {"eval/loss": loss_sum / weight, "eval/accuracy": correct / weight}
    if setup.text:
        metrics["eval/perplexity"] = math.exp(metrics["eval/loss"])
        metrics["eval/bits_per_token"] = metrics["eval/loss"] / math.log(2)
    return metrics


class Metrics:
    """step,tag,value rows appended to metrics.csv and written to TensorBoard, as produced
    (workdir None: nothing is written, as on the processes other than 0 of several hosts)."""

    def __init__(self, workdir: Path | None):
        self.file = None
        if workdir is None:
            return
        from tensorboardX import SummaryWriter

        self.path = workdir / "metrics.csv"
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")  # noqa: SIM115  (closed in close())
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(["step", "tag", "value"])
        self.writer = SummaryWriter(str(workdir))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.file is None:
            return
        for tag, value in values.items():
            self.csv.writerow([step, tag, value])
            self.writer.add_scalar(tag, value, step)
        self.file.flush()
        self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()


# Fields a checkpoint depends on beyond the model: the optimizer state's structure and the data
# stream. Others (num_steps, learning_rate, eval_every, ...) may change on resume.
RESUME_FIELDS = ("dataset", "data_dir", "seq_len", "batch_size", "seed", "grad_clip")


def check_workdir(workdir: Path, resolved: dict[str, Any]) -> None:
    """Refuses a workdir whose checkpoints belong to another model or data stream, naming the
    fields (model.* and RESUME_FIELDS)."""
    path = workdir / "config.json"
    if not path.exists() or not any((workdir / "checkpoints").glob("[0-9]*")):
        return
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(resolved, default=str))
    pairs = [(f, saved.get(f), now.get(f)) for f in RESUME_FIELDS]
    model = sorted(set(saved["model"]) | set(now["model"]))
    pairs += [(f"model.{k}", saved["model"].get(k), now["model"].get(k)) for k in model]
    differ = [f"{k}: {a!r} there, {b!r} here" for k, a, b in pairs if a != b]
    if differ:
        raise WorkdirMismatch(
            f"{workdir} holds checkpoints of another run ({'; '.join(differ)}); "
            "use another --workdir. Nothing was changed."
        )


def restore(manager: ocp.CheckpointManager, abstract: Any, data: Any, out: TextIO) -> Any:
    """The newest readable checkpoint's state (and `data` set to its position), or None. An
    unreadable checkpoint is moved to <checkpoints>/../corrupt/<step>, with a warning."""
    for step in sorted(manager.all_steps(), reverse=True):
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data)
        )
        try:
            return manager.restore(step, args=args).state
        except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back)
            corrupt = Path(manager.directory).parent / "corrupt" / str(step)
            corrupt.parent.mkdir(exist_ok=True)
            shutil.move(str(Path(manager.directory) / str(step)), corrupt)
            manager.reload()
            print(
                f"warning: checkpoint {step} is unreadable ({type(e).__name__}: "
                f"{str(e)[:200]}); moved to {corrupt}, trying the one before",
                file=out,
            )
    return None


def save(manager: ocp.CheckpointManager, state: Any, data: Any) -> None:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data)
    )
    manager.save(int(state["step"]), args=args)
    manager.wait_until_finished()


def train(
    config: Any, workdir: Path, out: TextIO = sys.stdout, stop_after: int = 0
) -> dict[str, float]:
    """Trains (or resumes) into `workdir`; returns the last evaluation's metrics (empty when
    no step ran). Raises ConfigError or WorkdirMismatch before anything is written."""
    setup_ = setup(config)
    c = config
    mesh = distributed.make_mesh(c.mesh.data, c.mesh.seq)
    row = setup_.seq_len or len(setup_.train_source[0]["inputs"])
    distributed.check_batch(mesh, c.batch_size, row, setup_.model_config)
    state = distributed.place_state(mesh, init_state(setup_))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    resolved = {**c.to_dict(), "model": dataclasses.asdict(setup_.model_config), "params": params}
    check_workdir(workdir, resolved)
    workdir.mkdir(parents=True, exist_ok=True)
    data = pipeline.train_batches(
        setup_.train_source, batch_size=c.batch_size, seed=c.seed, seq_len=setup_.seq_len
    )
    options = ocp.CheckpointManagerOptions(max_to_keep=c.keep, create=True)
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").resolve(), options=options, item_names=("state", "data")
    )
    restored = restore(manager, distributed.abstract_state(mesh, state), data, out)
    lead = jax.process_index() == 0  # several hosts: one writes the files, one reports
    if lead:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=1, default=str))
    start = 0 if restored is None else int(restored["step"])
    state = state if restored is None else restored
    print(
        f"{c.dataset}: {setup_.model_config.attention}, {params:,} parameters, mesh data="
        f"{mesh.shape['data']} x seq={mesh.shape['seq']}; "
        + (f"resuming at step {start}" if start else "from scratch"),
        file=out,
    )
    train_step, eval_step = make_steps(setup_)
    rows, one = distributed.batch_sharding(mesh), distributed.replicated(mesh)  # `one`: all of it
    train_step = jax.jit(train_step, in_shardings=(one, rows), out_shardings=one, donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(one, rows), out_shardings=one)
    metrics = Metrics(workdir if lead else None)
    metrics.write(start, {"model/params": params})
    stop: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in SIGNAL_EXIT}
    last_eval: dict[str, float] = {}
    tokens = c.batch_size * setup_.model_config.max_len
    bar = tqdm.tqdm(total=c.num_steps, initial=start, file=out, disable=None if lead else True,
                    unit="step")  # fmt: skip
    try:
        with jax.set_mesh(mesh):  # `ring` attention finds its `seq` axis here
            tick, ticked = time.perf_counter(), start
            for step in range(start + 1, c.num_steps + 1):
                state, values = train_step(state, distributed.place_batch(mesh, next(data)))
                bar.update(1)
                if step % c.log_every == 0 or step == c.num_steps:
                    loss = float(values["loss"])
                    seconds = time.perf_counter() - tick
                    metrics.write(step, {
                        "train/loss": loss,
                        "train/accuracy": float(values["accuracy"]),
                        "train/learning_rate": float(values["learning_rate"]),
                        "train/tokens_per_s": tokens * (step - ticked) / seconds,
                    })  # fmt: skip
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if step % c.eval_every == 0 or step == c.num_steps:
                    last_eval = evaluate(setup_, eval_step, state["params"], mesh)
                    metrics.write(step, last_eval)
                    line = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                    bar.write(f"step {step}: {line}", file=out)
                ends = step == c.num_steps or (stop_after and step - start >= stop_after)
                if step % c.checkpoint_every == 0 or ends or stop:
                    save(manager, state, data)
                if step % c.log_every == 0:
                    tick, ticked = time.perf_counter(), step
                if stop or ends:
                    break
    finally:
        bar.close()
        metrics.close()
        manager.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stop:
        print(f"stopped by signal {stop[0]} at step {int(state['step'])}; saved", file=out)
        sys.exit(SIGNAL_EXIT[stop[0]])
    return last_eval


def define_flags() -> None:
    """The command line's flags (defined only when this module runs as the program, so that
    the sweep can import the training functions)."""
    config_flags.DEFINE_config_file("config", None, "training config (configs/*.py)")
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config")
    flags.DEFINE_integer(
        "stop_after", 0, "save and stop after this many steps of this invocation (0: to the end)"
    )
    distributed.define_flags()


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.ERROR)  # libraries' info and warnings (orbax, TFDS) stay quiet
    distributed.initialize_from_flags()  # several hosts: before anything touches the devices
    if len(argv) > 1:
        print(f"invalid config: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if config is None or workdir is None:
        message = "--config=configs/<name>.py and --workdir are required"
        print(f"invalid config: {message}", file=sys.stderr)
        sys.exit(2)
    try:
        train(config, Path(workdir), stop_after=flags.FLAGS.stop_after)
    except ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkdirMismatch as e:
        print(e, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
