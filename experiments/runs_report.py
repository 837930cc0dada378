"""Training workdirs side by side: `python -m experiments.report runs/` finds every training
workdir under a folder (config.json and metrics.csv) and writes runs.md (final metrics,
convergence, the evaluation at each length from evaluation.jsonl), runs.csv and runs.png
(evaluation curves, and quality against context length where runs were evaluated at several
lengths). Each run's curves are also in TensorBoard: `tensorboard --logdir runs/`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.workdir import current_config, read_jsonl, read_metrics, read_summary

QUALITY = ("eval/bits_per_token", "eval/accuracy")  # the first a run logged is its score
CSV_FIELDS = ("run", "dataset", "attention", "params", "learning_rate", "seed", "step", "score")
CSV_FIELDS += ("final", "converged", "steps_to_threshold", "by_length")


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
    if save(runs_figure, rows, root / "runs.png"):
        md += ["", "![runs](runs.png)"]
    with open(root / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "by_length": json.dumps(r.get("by_length"))} for r in rows)
    path = root / "runs.md"
    path.write_text("\n".join(md) + "\n")
    return path


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
