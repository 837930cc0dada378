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

from experiments.quality_report import best_rate
from experiments.workdir import current_config, read_jsonl, read_metrics, read_summary
from transformer.config import pattern_name

QUALITY = ("eval/bits_per_token", "eval/accuracy")  # the first a run logged is its score
CSV_FIELDS = ("run", "dataset", "attention", "params", "learning_rate", "seed", "step", "score")
CSV_FIELDS += ("final", "converged", "steps_to_threshold", "by_length")
# Config fields that do not change what a run learns (with its seed and learning rate, the
# axes of the protocol table): runs equal in every other field share a setting. `options`
# holds every registered variant's options; a setting keeps only those of its own variants.
NOT_SETTING = ("seed", "learning_rate", "versions", "params", "data_dir", "keep", "log_every")
NOT_SETTING += ("checkpoint_every", "mesh", "options")


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
        "attention": attention_name((config.get("model") or {}).get("attention")),
        "params": config.get("params"),
        "learning_rate": config.get("learning_rate"),
        "seed": config.get("seed"),
        "step": max((s for s, _, _ in metrics), default=0),
        "score": score,
        "final": last.get(score) if score else None,
        "converged": summary.get("converged"),
        "finished": bool(summary),  # summary.json is written when a run ends
        "steps_to_threshold": summary.get("steps_to_threshold"),
        "curve": [[s, e[score]] for s, e in sorted(evals.items()) if score in e],
        "setting": setting(config),
    }
    evaluated = read_jsonl(workdir / "evaluation.jsonl")  # the newest row per length (depth)
    if evaluated:
        by = {_at(r): r.get("bits_per_token", r.get("accuracy")) for r in evaluated}
        row["by_length"] = dict(sorted(by.items(), key=lambda kv: _place(kv[0])))
    return row


def attention_name(attention: str | list[str] | None) -> str | None:
    """A hybrid's layer pattern (a list in config.json) as text: sliding_window*3+dense."""
    return pattern_name(attention) if isinstance(attention, list) else attention


def setting(config: dict[str, Any]) -> dict[str, Any]:
    """What a run learned from: its config less NOT_SETTING, with the options of its own
    variants as `options` (from `model.attention_options`, where the run recorded them)."""
    kept = {k: v for k, v in config.items() if k not in NOT_SETTING}
    model = dict(kept.get("model") or {})
    attention = model.get("attention")
    names = list(dict.fromkeys(attention if isinstance(attention, list) else [attention]))
    recorded = model.pop("attention_options", None)
    if recorded is None:
        used = {n: (config.get("options") or {}).get(n) for n in names}
    elif isinstance(attention, list):  # a hybrid's: [[variant, [[option, value], ...]], ...]
        used = {n: dict(pairs) for n, pairs in recorded}
    else:
        used = {attention: dict(recorded)}
    return {**kept, "model": model, "options": used}


def _at(row: dict[str, Any]) -> str:
    """An evaluation's place: its length; `/window` when text was read in longer windows per
    file (each call of experiments.evaluate scores the same tokens at all its lengths, so only
    scores of one window compare); `@depth` for a passkey needle depth."""
    depth = (row.get("data") or {}).get("depth")
    window = row.get("per_document")
    text = f"{row['length']}" + (f"/{window}" if window and window != row["length"] else "")
    return text + (f"@{depth:g}" if depth is not None else "")


def _place(at: str) -> tuple[int, int, float]:
    """(window, length, depth) of an `_at` text, for sorting and plotting."""
    rest, _, depth = at.partition("@")
    length, _, window = rest.partition("/")
    return int(window or length), int(length), float(depth or 0)


def write_runs_report(root: str | Path, save: Callable[..., bool]) -> Path:
    """runs.md, runs.csv and (with matplotlib) runs.png in `root`; ValueError without runs."""
    root = Path(root)
    rows = [run_row(w, root) for w in find_runs(root)]
    if not rows:
        raise ValueError(f"no training workdir (config.json and metrics.csv) under {root}")
    lengths = sorted({n for r in rows for n in r.get("by_length", {})}, key=_place)
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
        "T=n: the score evaluated at length n (experiments.evaluate); n/w: at length n in "
        "windows of w tokens per file (compare scores of one w); n@d: at needle depth d.",
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


def _apart(setting: dict[str, str], peers: list[dict[str, str]]) -> str:
    """` (field=value, ...)`: where `setting` differs from any of its peers ('' if nowhere)."""
    apart = [
        f"{name}={value}"
        for name, value in setting.items()
        if name not in ("dataset", "model.attention") and any(p.get(name) != value for p in peers)
    ]
    return f" ({', '.join(apart)})" if apart else ""


def _rate(lr: float | None, best: float | None, rates: list[float | None]) -> str:
    """A rate as text: the best in bold, ◂ when it is the smallest or largest run."""
    text = "-" if lr is None else f"{lr:g}"
    if lr != best:
        return text
    return f"**{text}**" + ("◂" if lr in (rates[0], rates[-1]) else "")


def _mean(values: list[float], with_count: bool = False) -> str:
    """`mean [min-max]` (one value: itself), or `mean (n)`."""
    if with_count:
        return f"{statistics.fmean(values):.4f} ({len(values)})"
    spread = f" [{min(values):.4f}-{max(values):.4f}]" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.4f}{spread}"


def protocol_table(rows: list[dict[str, Any]], lengths: list[str]) -> list[str]:
    """Markdown: the finished runs of each setting (equal configs but for seed and learning
    rate, one metric) by learning rate: the seeds' final scores (mean [min-max], std) and their mean
    evaluations at other lengths; the best rate by the mean (lowest bits per token, highest
    accuracy; ties: the smaller rate) in bold, ◂ when it is the edge of the rates run (a better
    one may lie beyond). A setting is named by its attention and the fields that set it apart
    from the other settings of that dataset and attention."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["finished"] and r["final"] is not None:
            key = json.dumps([r["score"], r["setting"]], sort_keys=True)
            groups.setdefault(key, []).append(r)
    if not groups:
        return []
    flat = {key: _flat(runs[0]["setting"]) for key, runs in groups.items()}
    head = ["dataset", "setting", "metric", "lr", "seeds", "final (mean [min-max])", "std"]
    head += [f"T={n}" for n in lengths]
    md = ["", "## Learning rates and seeds", "", "| " + " | ".join(head) + " |"]
    md.append("|---" * len(head) + "|")
    for key, runs in groups.items():
        first = runs[0]
        task = (first["dataset"], first["attention"])
        peers = [
            flat[k] for k in groups if (groups[k][0]["dataset"], groups[k][0]["attention"]) == task
        ]
        label = f"{first['attention']}{_apart(flat[key], peers)}"
        by_rate: dict[float | None, list[float]] = {}
        for r in runs:
            by_rate.setdefault(r["learning_rate"], []).append(r)
        rates = sorted(by_rate, key=lambda lr: (lr is not None, lr or 0.0))
        means = {lr: statistics.fmean(r["final"] for r in by_rate[lr]) for lr in rates}
        best = best_rate(means, higher_is_better=first["score"] == "eval/accuracy")  # or bits
        for lr in rates:
            finals = [r["final"] for r in by_rate[lr]]
            std = f"{statistics.stdev(finals):.4f}" if len(finals) > 1 else "-"
            cells = [*task[:1], label, first["score"], _rate(lr, best, rates), len(finals)]
            cells += [_mean(finals), std]
            for n in lengths:
                at = [r["by_length"][n] for r in by_rate[lr] if n in r.get("by_length", {})]
                cells.append(_mean(at, with_count=True) if at else "")
            md.append("| " + " | ".join(map(str, cells)) + " |")
    return md


def runs_figure(rows: list[dict[str, Any]]) -> Any:
    """Left: each run's evaluation curve; right: its score against the evaluated length."""
    import matplotlib.pyplot as plt

    fig, (curves, lengths) = plt.subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(rows):
        colour = f"C{i % 10}"
        if r["curve"]:
            curves.plot(*zip(*r["curve"], strict=True), color=colour, label=r["run"])
        windows: dict[int, list[tuple[int, float]]] = {}
        for at, value in (r.get("by_length") or {}).items():
            window, length, _ = _place(at)
            if "@" not in at:
                windows.setdefault(window, []).append((length, value))
        if windows:  # the evaluation with the most lengths (ties: the longest windows)
            points = max(windows.items(), key=lambda kv: (len(kv[1]), kv[0]))[1]
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
