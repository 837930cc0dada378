"""Train the TransformerLM on a project dataset, one attention variant swapped, the rest equal.

    python -m experiments.train --config=configs/mqar.py --workdir=runs/mqar \
        [--config.model.attention=linear] [--config.num_steps=2000] [--stop_after=100]

The dataset (a TFDS name with its config, e.g. `mqar/small`) is built on first use into
`data_dir`. The loss is the cross-entropy on the rows' weighted positions only (MQAR's
queries, ListOps' answer, every real token of text). AdamW with linear warmup and cosine decay,
global-norm clipping, a jitted step with the state donated. The workdir receives:

    config.json        the first run's resolved config (model's parameter count, code and jax
                       versions); resumes.jsonl: one row per resumed invocation
    checkpoints/<step> orbax: item `state` (params, opt_state, step, rng; StandardSave, so plain
                       orbax restores it) and item `data` (the grain iterator's position)
    metrics.csv        step,tag,value rows: train/loss and train/accuracy (averaged over the
                       logging window), train/learning_rate, train/tokens_per_s (the rows'
                       tokens, compilation excluded), train/first_step_s, eval/loss,
                       eval/accuracy (text also eval/perplexity, eval/bits_per_token)
    events.out.tfevents.*  the same scalars for TensorBoard (`tensorboard --logdir runs/`)
    summary.json       when the run ends: the last evaluation, the eval curve, convergence

Every `eval_every` steps the held-out split is evaluated; with `threshold` > 0 the run stops
once `threshold_metric` reaches it (convergence, not a fixed budget). A rerun of the same
command resumes from the newest readable checkpoint, with the data position and the rng, so a
stopped and resumed run ends with the parameters of an uninterrupted one; metrics logged after
that checkpoint are dropped first, so each (step, tag) appears once. A checkpoint that cannot be
read is skipped for the one before (and moved to `corrupt/`); a readable one that does not
restore (another model, out of memory) stops the run (exit 1) naming its step, as does a workdir
none of whose checkpoints can be read; nothing is moved then. A workdir trained with another
model, data stream or optimizer structure is refused, naming the fields; another schedule
(learning rate, steps, warmup, weight decay, threshold) only with --allow_changes, which is
said and recorded (experiments/workdir.py). A finished run trains nothing and writes nothing.
SIGTERM or Ctrl-C saves a checkpoint, then exits (143 or 130). Exit 2 for an invalid config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import checkpoints, datasets, distributed
from experiments.configlib import ConfigError, float_field, int_field, parse_flags
from experiments.datasets import pipeline
from experiments.datasets.base import config_fields
from experiments.workdir import (
    Metrics,
    WorkdirMismatch,
    check_resume,
    read_metrics,
    read_summary,
    record_start,
    write_summary,
)
from transformer import EncoderDecoder, ModelConfig, TransformerLM, budget
from transformer.config import layer_pattern
from transformer.model import weighted_token_stats

SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclasses.dataclass
class Setup:
    """What a config resolves to: the model, its optimizer and the data sources."""

    config: Any
    model_config: ModelConfig
    train_source: Any
    eval_source: Any
    seq_len: int | None  # packed row length of a text dataset, else None (task rows)
    targeted: int | None = None  # most weighted positions in a task row (logits only there)
    seq2seq: bool = False  # rows are a source and its translation: an EncoderDecoder
    dataset_fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # builder config

    @property
    def text(self) -> bool:
        return self.seq_len is not None

    @property
    def model(self) -> TransformerLM | EncoderDecoder:
        return (EncoderDecoder if self.seq2seq else TransformerLM)(self.model_config)

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
    for name in ("warmup_steps", "seq_len", "eval_examples", "eval_tokens", "seed"):
        int_field(config, name, 0)
    if config.get("match_params"):
        int_field(config, "match_params", 0)
        if config.match_field not in budget.MATCH_FIELDS:
            raise ConfigError("match_field", f"must be one of {budget.MATCH_FIELDS}")
    if config.warmup_steps >= config.num_steps:
        raise ConfigError("warmup_steps", f"must be < num_steps={config.num_steps}")
    for name in ("learning_rate", "weight_decay", "grad_clip", "threshold"):
        float_field(config, name, strict=False)
    if config.threshold and config.threshold_metric not in EVAL_METRICS:
        raise ConfigError("threshold_metric", f"must be one of {EVAL_METRICS}")


EVAL_METRICS = ("eval/accuracy",)  # metrics a threshold may stop at (higher is better)


def _model_config(config: Any, vocab_size: int, max_len: int, classes: int = 0) -> ModelConfig:
    """The model's fields; 0 for vocab_size, max_len and num_classes: the dataset's."""
    fields = config.model.to_dict()
    fields["vocab_size"] = fields["vocab_size"] or vocab_size
    fields["max_len"] = fields["max_len"] or max_len
    if fields.get("num_classes", 0) not in (0, classes):
        have = f"{classes} classes" if classes else "no classes (a token task)"
        raise ConfigError("model.num_classes", f"{config.dataset} has {have}; use 0")
    fields["num_classes"] = classes
    try:
        # each attention's options from config.options (per variant of a hybrid); the
        # encoder's and cross-attention's are an EncoderDecoder's
        for key in ("attention", "encoder_attention", "cross_attention"):
            if fields.get(key):
                names = layer_pattern(fields[key])
                each = {name: dict(config.options.get(name) or {}) for name in names}
                fields[f"{key}_options"] = each if len(names) > 1 else each[names[0]]
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError("model", str(e)) from None


def setup(config: Any, dataset_config: Any = None) -> Setup:
    """Validates `config` (ConfigError naming the field), the model's fields included, then
    builds the dataset when missing (`config.dataset` names it; `dataset_config`, a builder
    config, may set it instead)."""
    _check(config)
    _model_config(config, vocab_size=2, max_len=8)  # the model's own fields, before any data
    try:
        builder = datasets.prepare(config.dataset, config.data_dir or None, dataset_config)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        raise ConfigError("dataset", str(e)) from None
    splits = builder.as_data_source()
    if config.eval_split not in splits or "train" not in splits:
        raise ConfigError("eval_split", f"{config.dataset} has splits {sorted(splits)}")
    train_source, eval_source = splits["train"], splits[config.eval_split]
    text = pipeline.is_text(train_source)
    row = None if text else len(train_source[0]["inputs"])
    if row is not None and config.seq_len not in (0, row):
        raise ConfigError(
            "seq_len", f"{config.dataset} has rows of {row} tokens; seq_len packs text (use 0)"
        )
    if config.eval_examples:
        eval_source = [eval_source[i] for i in range(min(config.eval_examples, len(eval_source)))]
    if config.eval_tokens:
        if not text:
            raise ConfigError("eval_tokens", f"{config.dataset} is not text (use eval_examples)")
        eval_source = pipeline.eval_subset(eval_source, max_tokens=config.eval_tokens)
    seq_len = config.seq_len or config.model.max_len or row
    if seq_len is None:
        raise ConfigError("seq_len", "a text dataset needs seq_len or model.max_len")
    classes = 0 if text else builder.builder_config.num_classes()
    model_config = _model_config(config, builder.builder_config.vocab_size(), seq_len, classes)
    targeted = None
    if not text and not classes:  # MQAR's N queries, ListOps' answer: logits only there
        most = builder.builder_config.max_targets()
        targeted = most if 2 * most <= row else None
    text_len = seq_len if text else None
    fields = config_fields(builder.builder_config)  # what rebuilds it at another length
    seq2seq = not text and builder.builder_config.is_seq2seq()
    if not model_config.causal and not (classes or seq2seq):
        raise ConfigError("model.causal", f"{config.dataset} is next-token prediction: a "
                          "bidirectional model would read the targets (False is for "
                          "classification rows)")  # fmt: skip
    if seq2seq:
        targeted = None
    if config.get("match_params"):
        try:
            model_config = budget.matched(model_config, config.match_params, config.match_field,
                                          seq2seq)  # fmt: skip
        except ValueError as e:
            raise ConfigError("match_params", str(e)) from None
    return Setup(config, model_config, train_source, eval_source, text_len, targeted,
                 seq2seq, fields)  # fmt: skip


def init_state(setup: Setup) -> dict[str, Any]:
    """params, optimizer state, step and rng (raw key data), all plain arrays."""
    key = jax.random.key(setup.config.seed)
    tokens = jnp.zeros((1, setup.model_config.max_len), jnp.int32)
    params = setup.model.init(key, *[tokens] * (2 if setup.seq2seq else 1))["params"]
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    opt_state = setup.optimizer().init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(0), "rng": rng}


def make_steps(setup: Setup):
    """The train step (state, batch) -> (state, metrics) and the eval step (params, batch) ->
    weighted sums; not jitted (the caller jits, donating the state where it can)."""
    model, optimizer, schedule = setup.model, setup.optimizer(), setup.schedule()

    def stats(params, batch, **kwargs):
        """Weighted loss sums; with `setup.targeted`, logits only at the weighted positions
        (the same sums: every weighted position of a row is among its top `targeted`); a
        classifier's class logits against the label at position 0 of each row."""
        targets, weights, at = batch["targets"], batch["weights"], None
        if setup.seq2seq:  # the source's documents; the targets are one translation per row
            inputs, ids = batch["inputs"], batch["segment_ids"]
            logits = model.apply({"params": params}, inputs, targets, ids, **kwargs)
            return weighted_token_stats(logits, targets, weights)
        if setup.model_config.num_classes:
            logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                 **kwargs)  # fmt: skip
            return weighted_token_stats(logits[:, None], targets[:, :1], weights[:, :1])
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


def summarize(config: Any, evals: dict[int, dict[str, float]], step: int) -> dict[str, Any]:
    """The run's evaluations as a result: the last one's metrics, the curve of the threshold
    metric ([step, value] pairs), the first step that reached the threshold and whether the
    run converged (reached it; without a threshold: ran its num_steps)."""
    metric, threshold = config.threshold_metric, config.threshold
    curve = [[s, evals[s][metric]] for s in sorted(evals) if metric in evals[s]]
    reached = [s for s, v in curve if threshold and v >= threshold]
    return {
        "step": step,
        "metrics": evals[max(evals)] if evals else {},
        "eval_curve": curve,
        "threshold_metric": metric,
        "threshold": threshold or None,
        "steps_to_threshold": reached[0] if reached else None,
        "converged": bool(reached) if threshold else step >= config.num_steps,
    }


def _logged(workdir: Path, tag: str, until: int) -> float:
    """The last value of `tag` metrics.csv holds up to step `until` (0.0 if none)."""
    values = [v for step, t, v in read_metrics(workdir) if t == tag and step <= until]
    return values[-1] if values else 0.0


def _logged_evals(workdir: Path, until: int) -> dict[int, dict[str, float]]:
    """The evaluations metrics.csv holds up to step `until`."""
    evals: dict[int, dict[str, float]] = {}
    for step, tag, value in read_metrics(workdir):
        if tag.startswith("eval/") and step <= until:
            evals.setdefault(step, {})[tag] = value
    return evals


def train_and_evaluate(
    config: Any,
    workdir: Path,
    *,
    dataset_config: Any = None,
    out: TextIO = sys.stdout,
    stop_after: int = 0,
    allow_changes: bool = False,
    prepared: Setup | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) into `workdir`, evaluating every eval_every steps and stopping
    early once `threshold_metric` reaches `threshold` (when > 0); returns `summarize`'s result
    with `params` and `train_s` (written to summary.json too when the run ends). Raises
    ConfigError or WorkdirMismatch before anything is written, RestoreError or
    NoReadableCheckpoint (experiments/checkpoints.py) before anything is trained."""
    setup_ = prepared or setup(config, dataset_config)  # prepared: setup(config) already built
    c = config
    mesh = distributed.make_mesh(c.mesh.data, c.mesh.seq)
    row = setup_.seq_len or len(setup_.train_source[0]["inputs"])
    distributed.check_batch(mesh, c.batch_size, row, setup_.model_config, setup_.seq2seq)
    state = distributed.place_state(mesh, init_state(setup_))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    resolved = {**c.to_dict(), "model": dataclasses.asdict(setup_.model_config), "params": params}
    resolved["dataset_config"] = setup_.dataset_fields  # what evaluation at other lengths edits
    changed = check_resume(workdir, resolved, allow_changes)
    workdir.mkdir(parents=True, exist_ok=True)
    data = pipeline.train_batches(
        setup_.train_source, batch_size=c.batch_size, seed=c.seed, seq_len=setup_.seq_len
    )
    manager = checkpoints.manager(workdir / "checkpoints", c.keep)
    try:
        restored = checkpoints.restore(manager, distributed.abstract_state(mesh, state), data, out)
    except BaseException:
        manager.close()
        raise
    start, state = (0, state) if restored is None else restored
    lead = jax.process_index() == 0  # several hosts: one writes the files, one reports
    evals = _logged_evals(workdir, start) if start else {}
    done = summarize(c, evals, start)
    if start >= c.num_steps or (start and done["steps_to_threshold"] is not None):
        manager.close()
        print(f"nothing to train: {workdir} finished at step {start}", file=out)
        return {**done, **(read_summary(workdir) or {}), "params": params}
    if lead:
        record_start(workdir, resolved, start, changed)
        if start == 0:
            (workdir / "summary.json").unlink(missing_ok=True)
    for name, (there, here) in changed.items():
        print(f"resuming with {name} {there!r} -> {here!r}: the new schedule from step "
              f"{start} on (recorded in resumes.jsonl)", file=out)  # fmt: skip
    matched = ""
    if c.get("match_params"):
        width = getattr(setup_.model_config, c.match_field)
        matched = f" (model.{c.match_field}={width}: closest to {c.match_params:,})"
    print(
        f"{c.dataset}: {setup_.model_config.attention_name}, {params:,} parameters{matched}, "
        f"mesh data={mesh.shape['data']} x seq={mesh.shape['seq']}; "
        + (f"resuming at step {start}" if start else "from scratch"),
        file=out,
    )
    train_step, eval_step = make_steps(setup_)
    rows, one = distributed.batch_sharding(mesh), distributed.replicated(mesh)  # `one`: all of it
    train_step = jax.jit(train_step, in_shardings=(one, rows), out_shardings=one, donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(one, rows), out_shardings=one)
    metrics = Metrics(workdir if lead else None, start)
    if start == 0:
        metrics.write(0, {"model/params": params})
    stop: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in SIGNAL_EXIT}
    bar = tqdm.tqdm(total=c.num_steps, initial=start, file=out, disable=None if lead else True,
                    unit="step")  # fmt: skip
    began, window = time.perf_counter(), Window()
    before = _logged(workdir, "train/elapsed_s", start)  # earlier invocations' training time
    try:
        with jax.set_mesh(mesh):  # `ring` attention finds its `seq` axis here
            for step in range(start + 1, c.num_steps + 1):
                batch = next(data)
                state, values = train_step(state, distributed.place_batch(mesh, batch))
                window.add(values, batch["inputs"].size, first=step == start + 1)
                bar.update(1)
                converged = False
                if step % c.eval_every == 0 or step == c.num_steps:
                    with window.excluded(state):  # not training time
                        evals[step] = evaluate(setup_, eval_step, state["params"], mesh)
                    metrics.write(step, evals[step])
                    line = ", ".join(f"{k} {v:.4f}" for k, v in evals[step].items())
                    bar.write(f"step {step}: {line}", file=out)
                    converged = bool(c.threshold) and evals[step][c.threshold_metric] >= c.threshold
                ends = step == c.num_steps or converged
                paused = bool(stop) or bool(stop_after and step - start >= stop_after)
                if step % c.log_every == 0 or ends or paused:
                    logged = window.flush()
                    logged["train/elapsed_s"] = before + time.perf_counter() - began
                    metrics.write(step, logged)
                    bar.set_postfix(loss=f"{logged['train/loss']:.4f}", refresh=False)
                if step % c.checkpoint_every == 0 or ends or paused:
                    with window.excluded(state):
                        checkpoints.save(manager, state, data)
                if ends or paused:
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
    step = int(state["step"])
    result = summarize(c, evals, step)
    result.update(params=params, train_s=before + time.perf_counter() - began)
    if result["steps_to_threshold"] is not None:
        print(f"reached {c.threshold_metric} >= {c.threshold:g} at step {step}", file=out)
    if lead and (step >= c.num_steps or result["steps_to_threshold"] is not None):
        write_summary(workdir, result)
    return result


class Window:
    """Training metrics averaged over a logging window (every step's loss, not the last
    batch's) and tokens/s over its steps. A run's first step (compilation) is timed apart as
    train/first_step_s and left out of the rate."""

    def __init__(self):
        self.sums, self.steps, self.tokens, self.extra, self.last = None, 0, 0, {}, None
        self.tick = time.perf_counter()

    def add(self, values: dict[str, Any], tokens: int, first: bool = False) -> None:
        """One step's metrics; `first`: the run's first step, whose time is compilation."""
        self.sums = values if self.sums is None else jax.tree.map(jnp.add, self.sums, values)
        self.steps, self.last = self.steps + 1, values
        if first:  # wait for it, time it, and start the clock after it
            jax.block_until_ready(values)
            self.extra["train/first_step_s"] = time.perf_counter() - self.tick
            self.tick = time.perf_counter()
        else:
            self.tokens += tokens

    @contextlib.contextmanager
    def excluded(self, state: Any):
        """Time spent inside (evaluating, saving) is left out of the window's rate; the steps
        dispatched before it are finished first, inside the window."""
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        yield
        self.tick += time.perf_counter() - t0

    def flush(self) -> dict[str, float]:
        """The window's averages; starts the next window."""
        logged = {f"train/{k}": float(v) / self.steps for k, v in self.sums.items()}
        if self.tokens:  # not a window of the first step alone
            logged["train/tokens_per_s"] = self.tokens / (time.perf_counter() - self.tick)
        logged["train/learning_rate"] = float(self.last["learning_rate"])  # the last step's
        logged.update(self.extra)
        self.__init__()
        return logged


def train(config: Any, workdir: Path, out: TextIO = sys.stdout, **kwargs: Any) -> dict[str, float]:
    """train_and_evaluate's last evaluation metrics (empty when none ran)."""
    return train_and_evaluate(config, workdir, out=out, **kwargs)["metrics"]


def define_flags() -> None:
    """The command line's flags (defined only when this module runs as the program, so that
    the sweep can import the training functions)."""
    config_flags.DEFINE_config_file("config", None, "training config (configs/*.py)")
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, config")
    flags.DEFINE_integer(
        "stop_after", 0, "save and stop after this many steps of this invocation (0: to the end)"
    )
    flags.DEFINE_bool(
        "allow_changes",
        False,
        "resume with other schedule fields (learning_rate, num_steps, "
        "warmup_steps, weight_decay, threshold): the new schedule from the restored step on",
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
    f = flags.FLAGS
    try:
        train_and_evaluate(
            config, Path(workdir), stop_after=f.stop_after, allow_changes=f.allow_changes
        )
    except ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkdirMismatch as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    except (checkpoints.RestoreError, checkpoints.NoReadableCheckpoint) as e:
        print(f"cannot resume: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
