"""Training workdirs side by side: `python -m experiments.report runs/` finds every training
workdir under a folder (config.json and metrics.csv) and writes runs.md (final metrics,
convergence, the evaluation at each length from evaluation.jsonl), runs.csv and runs.png
(evaluation curves, and quality against context length where runs were evaluated at several
lengths). Each run's curves are also in TensorBoard: `tensorboard --logdir runs/`.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.workdir import current_config, read_jsonl, read_metrics, read_summary

QUALITY = ("eval/bits_per_token", "eval/accuracy")  # the first a run logged is its score
CSV_FIELDS = ("run", "dataset", "attention", "params", "learning_rate", "seed", "step", "score")
CSV_FIELDS += ("final", "converged", "steps_to_threshold", "by_length")
# Config fields that do not change what a run learns (with its seed and learning rate, the
# axes of the protocol table): runs equal in every other field share a setting.
NOT_SETTING = ("seed", "learning_rate", "versions", "params", "data_dir", "keep", "log_every")
NOT_SETTING += ("checkpoint_every", "eval_every", "mesh")


def find_runs(root: Path) -> list[Path]:
    """Training workdirs under `root` (itself included), sorted."""
    found = {p.parent for p in root.rglob("config.json") if (p.parent / "metrics.csv").exists()}
    return sorted(found)


def run_row(workdir: Path, root: Path) -> dict[str, Any]:
    """One run: what it trained and where it ended."""
    config = current_config(workdir) or {}
    metrics = read_metrics(workdir)
    evals: dict[int, dict[str, float]] = {}
    for step, tag, value in metrics:
        if tag.startswith("eval/"):
            evals.setdefault(step, {})[tag] = value
    score = next((t for t in QUALITY if any(t in e for e in evals.values())), None)
    summary = read_summary(workdir) or {}
    last = evals[max(evals)] if evals else {}
    row = {
        "run": workdir.relative_to(root).as_posix() or ".",
        "dataset": config.get("dataset"),
        "attention": (config.get("model") or {}).get("attention"),
        "params": config.get("params"),
        "learning_rate": config.get("learning_rate"),
        "seed": config.get("seed"),
        "step": max((s for s, _, _ in metrics), default=0),
        "score": score,
        "final": last.get(score) if score else None,
        "converged": summary.get("converged"),
        "steps_to_threshold": summary.get("steps_to_threshold"),
        "curve": [[s, e[score]] for s, e in sorted(evals.items()) if score in e],
        "setting": {k: v for k, v in config.items() if k not in NOT_SETTING},
    }
    evaluated = read_jsonl(workdir / "evaluation.jsonl")  # the newest row per length (depth)
    if evaluated:
        by = {_at(r): r.get("bits_per_token", r.get("accuracy")) for r in evaluated}
        row["by_length"] = dict(
            sorted(by.items(), key=lambda kv: [float(x) for x in kv[0].split("@")])
        )
    return row


def _at(row: dict[str, Any]) -> str:
    """An evaluation's place: its length, and `@depth` for a passkey needle depth."""
    depth = (row.get("data") or {}).get("depth")
    return f"{row['length']}" + (f"@{depth:g}" if depth is not None else "")


def write_runs_report(root: str | Path, save: Callable[..., bool]) -> Path:
    """runs.md, runs.csv and (with matplotlib) runs.png in `root`; ValueError without runs."""
    root = Path(root)
    rows = [run_row(w, root) for w in find_runs(root)]
    if not rows:
        raise ValueError(f"no training workdir (config.json and metrics.csv) under {root}")
    lengths = list(dict.fromkeys(n for r in rows for n in r.get("by_length", {})))
    head = ["run", "dataset", "attention", "params", "lr", "seed", "step", "metric", "final"]
    head += ["converged", "steps to threshold", *(f"T={n}" for n in lengths)]
    md = [f"# Training runs under {root}", "", "| " + " | ".join(head) + " |"]
    md.append("|---" * len(head) + "|")
    for r in rows:
        final = f"{r['final']:.4f}" if r["final"] is not None else "-"
        cells = [r["run"], r["dataset"], r["attention"], f"{r['params'] or 0:,}"]
        cells += [r["learning_rate"], r["seed"], r["step"], r["score"] or "-", final]
        cells += [r["converged"], r["steps_to_threshold"] or "-"]
        by = r.get("by_length", {})
        cells += [f"{by[n]:.4f}" if n in by else "" for n in lengths]
        md.append("| " + " | ".join(map(str, cells)) + " |")
    md += [
        "",
        "T=n: the score evaluated at length n (experiments.evaluate); n@d: at needle depth d.",
    ]
    md += protocol_table(rows, lengths)
    if save(runs_figure, rows, root / "runs.png"):
        md += ["", "![runs](runs.png)"]
    with open(root / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "by_length": json.dumps(r.get("by_length"))} for r in rows)
    path = root / "runs.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and JSON values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value)
    return out


def _same_task(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["dataset"], a["attention"]) == (b["dataset"], b["attention"])


def _apart(setting: dict[str, str], peers: list[dict[str, str]]) -> str:
    """` (field=value, ...)`: where `setting` differs from any of its peers ('' if nowhere)."""
    apart = [
        f"{name}={value}"
        for name, value in setting.items()
        if name not in ("dataset", "model.attention", "model.attention_options")
        and any(p.get(name) != value for p in peers)
    ]
    return f" ({', '.join(apart)})" if apart else ""


def protocol_table(rows: list[dict[str, Any]], lengths: list[str]) -> list[str]:
    """Markdown: the runs of each setting (equal configs but for seed and learning rate) by
    learning rate, the seeds' final scores (mean [min-max], std) and their evaluations at other
    lengths; the best rate by the mean (lowest bits per token, highest accuracy) in bold, ◂ when
    it is the edge of the rates run (a better one may lie beyond). A setting is named by its
    attention and the fields that set it apart from the other settings of that attention."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["final"] is not None:
            groups.setdefault(json.dumps(r["setting"], sort_keys=True), []).append(r)
    if not groups:
        return []
    flat = {key: _flat(runs[0]["setting"]) for key, runs in groups.items()}
    md = ["", "## Learning rates and seeds", "", "| dataset | setting | lr | seeds | final "]
    md[-1] += "(mean [min-max]) | std | " + " | ".join(f"T={n}" for n in lengths) + " |"
    md.append("|---" * (6 + len(lengths)) + "|")
    for key, runs in groups.items():
        first = runs[0]
        peers = [flat[k] for k in groups if _same_task(groups[k][0], first)]
        label = first["attention"] + _apart(flat[key], peers)
        by_rate: dict[Any, list[dict[str, Any]]] = {}
        for r in runs:
            by_rate.setdefault(r["learning_rate"], []).append(r)
        sign = 1 if first["score"] == "eval/accuracy" else -1  # bits: lower is better
        means = {lr: statistics.fmean(r["final"] for r in rs) for lr, rs in by_rate.items()}
        best = max(means, key=lambda lr: sign * means[lr])
        rates = sorted(by_rate)
        for lr in rates:
            finals = [r["final"] for r in by_rate[lr]]
            rate = (
                f"**{lr:g}**" + ("◂" if lr in (rates[0], rates[-1]) else "")
                if lr == best
                else f"{lr:g}"
            )
            spread = f" [{min(finals):.4f}-{max(finals):.4f}]" if len(finals) > 1 else ""
            std = f"{statistics.stdev(finals):.4f}" if len(finals) > 1 else "-"
            at = []
            for n in lengths:
                values = [r["by_length"][n] for r in by_rate[lr] if n in r.get("by_length", {})]
                at.append(f"{statistics.fmean(values):.4f} ({len(values)})" if values else "")
            cells = [first["dataset"], label, rate, len(finals), f"{means[lr]:.4f}{spread}", std]
            md.append("| " + " | ".join(map(str, [*cells, *at])) + " |")
    return md


def runs_figure(rows: list[dict[str, Any]]) -> Any:
    """Left: each run's evaluation curve; right: its score against the evaluated length."""
    import matplotlib.pyplot as plt

    fig, (curves, lengths) = plt.subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(rows):
        colour = f"C{i % 10}"
        if r["curve"]:
            curves.plot(*zip(*r["curve"], strict=True), color=colour, label=r["run"])
        if r.get("by_length"):
            points = [(int(k), v) for k, v in r["by_length"].items() if "@" not in k]
            if points:
                lengths.plot(*zip(*points, strict=True), marker="o", color=colour, label=r["run"])
    metric = next((r["score"] for r in rows if r["score"]), "score")
    curves.set(xlabel="step", ylabel=metric, title="evaluation during training")
    lengths.set(xlabel="context length", ylabel=metric, title="at other lengths")
    lengths.set_xscale("log", base=2)
    for ax in (curves, lengths):
        ax.grid(True, alpha=0.3)
    curves.legend(fontsize=6)
    fig.tight_layout()
    return fig
