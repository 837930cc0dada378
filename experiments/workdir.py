"""A training workdir's history: what was run, with which code, and the metrics it logged.

    config.json     the first run's resolved config, with the code and jax versions; never
                    rewritten
    resumes.jsonl   one row per later invocation that trained: its step, config, versions and
                    the fields it changed
    metrics.csv     step,tag,value rows (and TensorBoard events), each (step, tag) once: a
                    resume first drops the rows logged after the step it restored
    summary.json    the last finished run's evaluation curve and convergence

A resume may change only fields that do not change what is trained (FREE_FIELDS); the
schedule's fields (SCHEDULE_FIELDS) change only when asked (`allow_changes`), said plainly and
recorded; the others (the model, the data stream, the optimizer state's structure) never.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any

from experiments import provenance

# Fields that change what is measured or how often, not what is trained.
FREE_FIELDS = ("data_dir", "eval_split", "eval_every", "eval_examples", "eval_tokens")
FREE_FIELDS += ("log_every", "checkpoint_every", "keep", "mesh", "options", "params")
FREE_FIELDS += ("versions",)
# The learning-rate schedule: a resumed run with other values follows the new schedule from
# the restored step on (a cosine schedule extended by num_steps rises again, for example).
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "num_steps", "weight_decay")
SCHEDULE_FIELDS += ("threshold", "threshold_metric")


class WorkdirMismatch(ValueError):
    """The workdir holds a run that this config cannot continue."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def current_config(workdir: Path) -> dict[str, Any] | None:
    """The config the workdir's checkpoints were last trained with (None: a new workdir)."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    rows = read_jsonl(workdir / "resumes.jsonl")
    return rows[-1]["config"] if rows else config


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Appends one JSON row and syncs it; a torn last line (a crash while it was written: no
    newline yet) is cut first, so the file stays one row per line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when missing); a torn last line (a crash while it
    was written) is left out, any other unreadable line raises."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


BY_FIELD = ("model", "dataset_config")  # sections compared field by field


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (there, here)} of the fields that differ, `model.*` and `dataset_config.*`
    field by field."""
    out = {}
    for name in sorted(set(saved) | set(now)):
        a, b = saved.get(name), now.get(name)
        if name in BY_FIELD and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    out[f"{name}.{k}"] = (a.get(k), b.get(k))
        elif a != b:
            out[name] = (a, b)
    return out


def model_default_added(saved: dict[str, Any], key: str, now: Any) -> bool:
    """Whether `key` differs only by what the code gained since the saved run, at the default
    the saved run used: a model field it lacks, kernel options its attention_options lack, or
    a dataset field its dataset_config lacks."""
    from transformer import ModelConfig

    section, _, name = key.partition(".")
    there = saved.get(section)
    if section not in BY_FIELD or not isinstance(there, dict):
        return False
    if name in there:
        if section == "model" and name == "attention_options":
            return _options_at_defaults(there.get("attention"), there[name], now)
        return False
    if section == "model":
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    else:
        defaults = _dataset_defaults(saved.get("dataset", ""))
    return name in defaults and _plain(defaults[name]) == now


def _dataset_defaults(dataset: str) -> dict[str, Any]:
    """The fields of the builder config class of `dataset` ("listops/short") at their defaults."""
    from experiments import datasets

    try:
        config_class = type(datasets.builder_class(dataset.split("/")[0]).BUILDER_CONFIGS[0])
    except ValueError:
        return {}
    return {f.name: f.default for f in dataclasses.fields(config_class)}


def _options_at_defaults(attention, there, now) -> bool:
    """Whether kernel options `now` are `there` plus options at their variants' defaults
    (pairs as ModelConfig stores them; a hybrid's per variant)."""
    import attention_variants as av
    from transformer.config import layer_pattern

    names = layer_pattern(attention)

    def same(name, a, b):
        a, b = dict(a), dict(b)
        defaults = av.spec(name).defaults
        added = {k: v for k, v in b.items() if k not in a}
        return {k: v for k, v in b.items() if k in a} == a and all(
            k in defaults and defaults[k] == v for k, v in added.items())  # fmt: skip

    try:
        if len(names) == 1:
            return same(names[0], there, now)
        a, b = dict(there), dict(now)
        return set(a) == set(b) and all(same(n, a[n], b[n]) for n in a)
    except (TypeError, ValueError):  # not pairs, or an unknown variant: a change
        return False


def check_resume(
    workdir: Path, resolved: dict[str, Any], allow_changes: bool = False
) -> dict[str, tuple[Any, Any]]:
    """The schedule fields this resume changes ({} for a new workdir or none). Raises
    WorkdirMismatch, naming the fields, for a change it may not make."""
    saved = current_config(workdir)
    if saved is None or not any((workdir / "checkpoints").glob("[0-9]*")):
        return {}
    changed = {  # a field the saved config lacks was added to the code since: not a change
        k: v
        for k, v in differences(saved, _plain(resolved)).items()
        if k.split(".")[0] not in FREE_FIELDS
        and k.split(".")[0] in saved
        and not model_default_added(saved, k, v[1])
    }
    fixed = {k: v for k, v in changed.items() if k not in SCHEDULE_FIELDS}
    schedule = {k: v for k, v in changed.items() if k in SCHEDULE_FIELDS}
    listed = lambda d: "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in d.items())  # noqa: E731
    if fixed:
        raise WorkdirMismatch(
            f"{workdir} holds checkpoints of another run ({listed(fixed)}); "
            "use another --workdir. Nothing was changed."
        )
    if schedule and not allow_changes:
        raise WorkdirMismatch(
            f"{workdir} was trained with another schedule ({listed(schedule)}). A resumed run "
            "would follow the new schedule from its step on; to do so, pass --allow_changes "
            "(recorded in resumes.jsonl), or use another --workdir. Nothing was changed."
        )
    return schedule


def record_start(
    workdir: Path, resolved: dict[str, Any], step: int, changed: dict[str, tuple[Any, Any]]
) -> None:
    """config.json on a run from scratch; a resumes.jsonl row on every resumed one."""
    entry = {**_plain(resolved), "versions": provenance.versions()}
    path = workdir / "config.json"
    if step == 0:  # nothing of an earlier start survives (no checkpoint): a new history
        (workdir / "resumes.jsonl").unlink(missing_ok=True)
        path.write_text(json.dumps(entry, indent=1))
        return
    row = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": step,
        "changed": {k: {"there": a, "here": b} for k, (a, b) in changed.items()},
        "config": entry,
    }
    append_jsonl(workdir / "resumes.jsonl", row)


def read_metrics(workdir: Path) -> list[tuple[int, str, float]]:
    """metrics.csv as (step, tag, value) rows ([] when there is none)."""
    path = workdir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]


class Metrics:
    """step,tag,value rows appended to metrics.csv and written to TensorBoard, as produced.
    Opened at the restored step `start`, it first drops the rows logged after it (a resumed
    run logs them again), in both. workdir None: nothing is written (processes other than 0
    of several hosts)."""

    def __init__(self, workdir: Path | None, start: int = 0):
        self.file = None
        if workdir is None:
            return
        from tensorboardX import SummaryWriter

        self.path = workdir / "metrics.csv"
        kept = [r for r in read_metrics(workdir) if start and r[0] <= start]  # 0: a new run
        if self.path.exists() and len(kept) < len(read_metrics(workdir)):
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([("step", "tag", "value"), *kept])
            os.replace(tmp, self.path)
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")  # noqa: SIM115  (closed in close())
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(["step", "tag", "value"])
        # TensorBoard drops the events of earlier runs at steps >= purge_step.
        self.writer = SummaryWriter(str(workdir), purge_step=start + 1 if start else None)

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


def write_summary(workdir: Path, summary: dict[str, Any]) -> None:
    tmp = workdir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, workdir / "summary.json")


def read_summary(workdir: Path) -> dict[str, Any] | None:
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None
