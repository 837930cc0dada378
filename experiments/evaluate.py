"""Evaluate a trained model at other context lengths, beyond the one it was trained at.

    python -m experiments.evaluate --workdir=runs/lm --lengths=256,512,1024,2048 \
        [--max_tokens=65536] [--per_document=2048] [--max_examples=1000] [--batch_tokens=8192]
    python -m experiments.evaluate --workdir=runs/passkey --lengths=128,256,512,1024 \
        --depths=0,0.25,0.5,0.75,1      # needle in a haystack: accuracy per length x depth

The workdir's config rebuilds the model at each length (RoPE, sinusoidal or no positions
extend; learned positions cannot pass the `max_len` they were trained with) and its newest
readable checkpoint gives the parameters. The held-out split is read at each length:
- text (a `text` feature, e.g. pystdlib): documents packed into rows of the length, on a budget
  of `max_tokens` held-out tokens drawn across many files (pipeline.eval_subset) in windows of
  at most `per_document` tokens per file (default: the longest length, at least
  pipeline.PER_DOCUMENT), so every length of one call scores the same tokens and the longest
  length's positions all occur;
- tasks (mqar, passkey, listops): the test split built anew at the length, with the fields
  that grow with the row (MQAR's num_pairs: more pairs in longer rows, as Zoology's
  `ar_extrapolate`) scaled by length / training length (`--no_scale` keeps them).
Each length appends one JSON row to <workdir>/evaluation.jsonl as it is measured: `length`,
`train_length`, `loss` (nats per target token), `bits_per_token` (text), `accuracy`,
`position_loss` (mean loss of the targets in each position bucket [2^(i-1), 2^i) of the
position within the document, so a reader sees whether later positions gain from the context)
and the checkpoint's `step` and code versions. A rerun reuses the rows of the same step,
length, data and code. Prints a table; with `--depths` (passkey) also the accuracy per
(depth, length) and the heat map <workdir>/passkey.png.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags, logging

from experiments import checkpoints, datasets, provenance
from experiments.datasets import pipeline
from experiments.plots import save_figure
from experiments.workdir import append_jsonl, current_config, read_jsonl
from transformer import ModelConfig, TransformerLM

LENGTH_SCALED = {"mqar": ("num_pairs",)}  # task fields that grow with the row length


class CannotEvaluate(ValueError):
    """The workdir's model or data cannot be evaluated as asked; the message says why."""


def load(workdir: Path, out: TextIO) -> tuple[dict[str, Any], Any, int]:
    """(the run's config, params, step) of the newest readable checkpoint."""
    saved = current_config(workdir)
    if saved is None or not any((workdir / "checkpoints").glob("[0-9]*")):
        raise CannotEvaluate(f"no trained model in {workdir} (config.json and checkpoints/)")
    manager = checkpoints.manager(workdir / "checkpoints")
    try:
        step, state = checkpoints.restore(manager, None, out=out, move_unreadable=False)
    except checkpoints.NoReadableCheckpoint as e:
        raise CannotEvaluate(str(e)) from None
    finally:
        manager.close()
    return saved, state["params"], step


def model_at(saved: dict[str, Any], length: int) -> TransformerLM:
    fields = dict(saved["model"])
    if fields["positions"] == "learned" and length > fields["max_len"]:
        raise CannotEvaluate(
            f"learned positions were trained up to max_len={fields['max_len']}; length {length} "
            "needs positions it has no embedding for (RoPE, sinusoidal or none extrapolate)"
        )
    return TransformerLM(ModelConfig(**{**fields, "max_len": max(length, fields["max_len"])}))


def fields_at(
    saved: dict[str, Any], length: int, args: Any, depth: float | None = None
) -> tuple[dict[str, Any], bool]:
    """(the dataset fields of the held-out rows at `length`, whether they are text); a
    `depth` sets the passkey's needle depth. Text keeps the run's fields (packed at `length`)."""
    name = saved["dataset"].split("/")[0]
    fields = dict(saved.get("dataset_config") or {})
    if "seq_len" not in fields:
        return fields, True
    train_length = fields["seq_len"]
    fields.update(seq_len=length, num_train=1, num_test=args.max_examples)
    if depth is not None:
        if "depth" not in fields:
            raise CannotEvaluate(f"{name} has no needle depth (--depths is for passkey)")
        fields["depth"] = depth
    for key in LENGTH_SCALED.get(name, ()) if args.scale else ():
        fields[key] = max(1, fields[key] * length // train_length)
    config = datasets.config_for(name, **fields)
    if config.num_classes() or config.is_seq2seq():
        raise CannotEvaluate(
            f"{name}: evaluation at other lengths scores token predictions; this run "
            f"{'classifies rows' if config.num_classes() else 'translates (an encoder-decoder)'}"
        )
    try:
        config.check()
    except ValueError as e:
        raise CannotEvaluate(f"{name} at length {length}: {e}") from None
    return fields, False


def per_document(args: Any) -> int:
    """Most scored tokens of one file in a text evaluation: `args.per_document`, by default the
    longest length (at least pipeline.PER_DOCUMENT), so its rows are filled by one file."""
    return args.per_document or max(pipeline.PER_DOCUMENT, *args.lengths)


def examples_at(saved: dict[str, Any], fields: dict[str, Any], text: bool, args: Any) -> list:
    """The held-out examples: a text budget drawn across the run's eval split, or the test
    split of the task built with `fields` (once; TFDS keeps it)."""
    data_dir = saved.get("data_dir") or None
    if text:
        source = datasets.prepare(saved["dataset"], data_dir).as_data_source()[saved["eval_split"]]
        return pipeline.eval_subset(source, args.max_tokens, per_document=per_document(args))
    name = saved["dataset"].split("/")[0]
    builder = datasets.prepare(name, data_dir, datasets.config_for(name, **fields))
    return list(builder.as_data_source()["test"])


def positions_in_document(segment_ids: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """[B, T] position of each token within its document (within the row without ids)."""
    index = np.broadcast_to(np.arange(shape[1]), shape)
    if segment_ids is None:
        return index
    starts = np.concatenate([np.ones((shape[0], 1), bool), np.diff(segment_ids) != 0], axis=1)
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def bucket(position: np.ndarray) -> np.ndarray:
    """Position bucket i holds [2^(i-1), 2^i) (bucket 0: position 0)."""
    return np.where(position > 0, np.floor(np.log2(np.maximum(position, 1))).astype(int) + 1, 0)


def bucket_name(i: int) -> str:
    return "0" if i == 0 else f"{2 ** (i - 1)}-{2**i - 1}"


def evaluate_length(model: TransformerLM, params: Any, examples: list, text: bool, length: int,
                    batch_rows: int, out: TextIO) -> dict[str, Any]:  # fmt: skip
    """Loss, accuracy and the per-bucket loss over the weighted positions of `examples`."""

    @jax.jit
    def token_stats(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], batch.get("segment_ids"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return losses, (jnp.argmax(logits, -1) == batch["targets"])

    sums, counts = {}, {}
    total = correct = weight = 0.0
    batches = pipeline.eval_batches(
        examples, batch_size=batch_rows, seq_len=length if text else None
    )
    for batch in tqdm.tqdm(batches, desc=f"length {length}", file=out, disable=None, leave=False):
        losses, right = (np.asarray(x) for x in token_stats(params, batch))
        w = np.asarray(batch["weights"], np.float64)
        ids = batch.get("segment_ids")
        where = bucket(positions_in_document(None if ids is None else np.asarray(ids), w.shape))
        total, correct, weight = (
            total + (losses * w).sum(),
            correct + (right * w).sum(),
            weight + w.sum(),
        )
        for i in np.unique(where[w > 0]):
            mask = (where == i) * w
            sums[int(i)] = sums.get(int(i), 0.0) + float((losses * mask).sum())
            counts[int(i)] = counts.get(int(i), 0.0) + float(mask.sum())
    if weight == 0:
        raise CannotEvaluate(f"no target token at length {length}")
    row = {"loss": total / weight, "accuracy": correct / weight, "tokens": int(weight)}
    if text:
        row["bits_per_token"] = row["loss"] / math.log(2)
    row["position_loss"] = {bucket_name(i): sums[i] / counts[i] for i in sorted(sums)}
    return row


@dataclasses.dataclass
class Args:
    lengths: list[int]
    max_tokens: int = 65536  # text: held-out tokens per length
    max_examples: int = 1000  # tasks: test rows per length
    batch_tokens: int = 8192  # tokens per evaluation batch (rows = batch_tokens // length)
    scale: bool = True  # tasks: scale LENGTH_SCALED fields with the length
    depths: list[float] | None = None  # passkey: one cell per (length, needle depth)
    per_document: int | None = None  # text: most tokens from one file (None: per_document())


def evaluate(workdir: Path, args: Args, out: TextIO = sys.stdout) -> list[dict[str, Any]]:
    """Evaluates the workdir's model at each length; returns and appends the rows."""
    saved, params, step = load(workdir, out)
    train_length = (saved.get("dataset_config") or {}).get("seq_len") or saved["model"]["max_len"]
    if saved.get("seq_len"):
        train_length = saved["seq_len"]
    path = workdir / "evaluation.jsonl"
    done = read_jsonl(path)
    versions = provenance.versions()
    rows, examples = [], None
    for length, depth in [(n, d) for n in args.lengths for d in args.depths or [None]]:
        model = model_at(saved, length)
        fields, text = fields_at(saved, length, args, depth)
        key = {"step": step, "length": length, "data": fields, **versions}
        if text:
            key.update(max_tokens=args.max_tokens, per_document=per_document(args))
        else:
            key["max_examples"] = args.max_examples
        old = [r for r in done if all(r.get(k) == v for k, v in key.items())]
        if old:
            rows.append(old[-1])
            print(f"length {length}: reused the row of step {step}", file=out)
            continue
        if not (text and examples):  # built only when measured; text: once for every length
            examples = examples_at(saved, fields, text, args)
        batch_rows = max(1, args.batch_tokens // length)
        row = {**key, "train_length": train_length, "attention": saved["model"]["attention"]}
        row.update(evaluate_length(model, params, examples, text, length, batch_rows, out))
        append_jsonl(path, row)
        rows.append(row)
        at = f" depth {depth:g}" if depth is not None else ""
        print(f"length {length}{at}: loss {row['loss']:.4f}, accuracy {row['accuracy']:.4f}",
              file=out)  # fmt: skip
    print(table(rows), file=out)
    if args.depths:
        print(depth_table(rows), file=out)
        if save_figure(depth_figure, rows, workdir / "passkey.png"):
            print(f"wrote {workdir / 'passkey.png'}", file=out)
    return rows


def depth_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy per needle depth (rows) and length (columns)."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["data"]["depth"] for r in rows})
    grid = {(r["data"]["depth"], r["length"]): r["accuracy"] for r in rows}
    lines = ["| depth | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    for d in depths:
        cells = [f"{grid[d, n]:.3f}" if (d, n) in grid else "" for n in lengths]
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_figure(rows: list[dict[str, Any]]) -> Any:
    """The needle-in-a-haystack heat map: accuracy per (length, depth)."""
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["data"]["depth"] for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index(r["data"]["depth"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set(xticks=range(len(lengths)), xticklabels=lengths, xlabel="context length",
           yticks=range(len(depths)), yticklabels=[f"{d:g}" for d in depths],
           ylabel="needle depth", title=f"passkey accuracy ({rows[0]['attention']})")  # fmt: skip
    for i, j in np.ndindex(grid.shape):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per length (and needle depth), the loss per position bucket."""
    names = list(dict.fromkeys(b for r in rows for b in r["position_loss"]))
    text = any("bits_per_token" in r for r in rows)
    depth = any(r["data"].get("depth") is not None for r in rows)
    head = ["length", *(["depth"] if depth else []), "x train", "tokens", "loss"]
    head += ["bits/token" if text else "accuracy", *names]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        score = r["bits_per_token"] if text else r["accuracy"]
        cells = [r["length"], *([r["data"].get("depth")] if depth else [])]
        cells += [f"{r['length'] / r['train_length']:g}", r["tokens"]]
        cells += [f"{r['loss']:.4f}", f"{score:.4f}"]
        cells += [f"{r['position_loss'][b]:.3f}" if b in r["position_loss"] else "" for b in names]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a training workdir (config.json and checkpoints/)")
    flags.DEFINE_list("lengths", None, "context lengths to evaluate at, e.g. 256,512,1024")
    flags.DEFINE_integer("max_tokens", Args.max_tokens, "text: held-out tokens per length")
    flags.DEFINE_integer(
        "per_document", None, "text: most tokens from one file (default: the longest length)"
    )
    flags.DEFINE_integer("max_examples", Args.max_examples, "tasks: test rows per length")
    flags.DEFINE_integer("batch_tokens", Args.batch_tokens, "tokens per evaluation batch")
    flags.DEFINE_bool("scale", True, "tasks: scale num_pairs etc. with the length")
    flags.DEFINE_list("depths", None, "passkey: needle depths in [0, 1], e.g. 0,0.25,0.5,0.75,1")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    if len(argv) > 1 or f.workdir is None or not f.lengths:
        print("usage: --workdir=<training workdir> --lengths=256,512,...", file=sys.stderr)
        sys.exit(2)
    try:
        lengths = [int(n) for n in f.lengths]
        depths = [float(d) for d in f.depths] if f.depths else None
    except ValueError:
        print(f"--lengths must be ints, --depths numbers: {f.lengths}, {f.depths}", file=sys.stderr)
        sys.exit(2)
    args = Args(lengths, f.max_tokens, f.max_examples, f.batch_tokens, f.scale, depths,
                f.per_document)  # fmt: skip
    try:
        evaluate(Path(f.workdir), args)
    except CannotEvaluate as e:
        print(f"cannot evaluate: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
