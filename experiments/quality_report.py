"""The quality side of a sweep report: train_eval rows aggregated as researchers report them.

Per variant, task and length the learning rate whose mean final accuracy over the seeds is
best is kept (Zoology's protocol: the rate swept per model); the report gives the mean, the
spread (min-max, standard deviation) over the seeds at that rate, whether the best rate sits at
the edge of the swept grid (the optimum may lie beyond it), and whether every seed converged
(reached `train.threshold` within the step cap).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Best:
    """One (variant, task, length) cell at its best learning rate."""

    label: str  # variant (with options where several sets ran) and task fields
    variant: str
    task: str
    seq_len: int
    learning_rate: float | None
    rates: tuple[float, ...]  # the grid swept
    rows: tuple[Row, ...]  # the seeds' rows at the best rate

    @property
    def accuracies(self) -> list[float]:
        return [r["accuracy"] for r in self.rows]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.accuracies) if len(self.rows) > 1 else None

    @property
    def edge(self) -> bool:
        """The best rate is the grid's smallest or largest (or the only one swept)."""
        return self.learning_rate in (self.rates[:1] + self.rates[-1:]) if self.rates else False

    @property
    def cost(self) -> float:
        """The training step's median time (ms), the median over the cell's rows."""
        return statistics.median(r["time_ms_median"] for r in self.rows)

    @property
    def converged(self) -> int:
        return sum(bool(r.get("converged")) for r in self.rows)

    def cell(self) -> str:
        """`mean [min-max]` with the flags, for a table of lengths."""
        spread = f" [{min(self.accuracies):.3f}-{max(self.accuracies):.3f}]" if self.std else ""
        return f"{self.mean:.3f}{spread}{self.flags()}"

    def flags(self) -> str:
        return ("◂" if self.edge else "") + ("~" if self.converged < len(self.rows) else "")


def best_rate(means: dict[float | None, float], higher_is_better: bool = True) -> float | None:
    """The learning rate of the best mean score (ties: the smaller rate)."""
    sign = 1 if higher_is_better else -1
    return max(means, key=lambda lr: (sign * means[lr], -(lr or 0.0)))


def best_rates(rows: Sequence[Row], label: Callable[[Row], str]) -> list[Best]:
    """The best learning rate of every (label, length) among the `ok` train_eval rows, by the
    mean over seeds of the final accuracy (ties: the smaller rate)."""
    groups: dict[tuple[str, int], dict[float | None, list[Row]]] = {}
    for r in rows:
        if r["mode"] == "train_eval" and r["status"] == "ok" and r.get("accuracy") is not None:
            by_rate = groups.setdefault((label(r), r["seq_len"]), {})
            by_rate.setdefault(r.get("learning_rate"), []).append(r)
    out = []
    for (name, T), by_rate in groups.items():
        rates = tuple(sorted(lr for lr in by_rate if lr is not None))
        means = {lr: statistics.fmean(r["accuracy"] for r in rs) for lr, rs in by_rate.items()}
        best = best_rate(means)
        chosen = tuple(sorted(by_rate[best], key=lambda r: r.get("seed") or 0))
        spec = chosen[0].get("task_spec") or chosen[0].get("task") or {}
        task = " ".join(f"{k}={v}" for k, v in spec.items())
        out.append(Best(name, chosen[0]["variant"], task, T, best, rates, chosen))
    return out


LEGEND = (
    "Per cell: the learning rate with the best mean final accuracy over the seeds, and at that "
    "rate the mean, [min-max] over the seeds and their standard deviation. ◂: the best rate is "
    "at the edge of the swept grid (or the only rate swept), so a better one may lie beyond. "
    "~: not every seed converged (reached `train.threshold`, or ran its whole step cap when no "
    "threshold is set). at T=n: the same models on test rows of length n (mean over the seeds; "
    "MQAR with proportionally more pairs)."
)


def quality_section(
    rows: Sequence[Row], workdir: Path, label: Callable[[Row], str], save: Callable[..., bool]
) -> list[str]:
    """Markdown: accuracy by length at the best rate per cell, the per-cell table with spread,
    convergence and cost, and quality.png (every seed's point, the mean at the best rate)."""
    best = best_rates(rows, label)
    lengths = sorted({b.seq_len for b in best})
    md = ["## Quality", "", LEGEND, "", "Accuracy on the held-out rows' weighted positions:", ""]
    md += ["| variant | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
    index = {(b.label, b.seq_len): b for b in best}
    for name in dict.fromkeys(b.label for b in best):
        cells = [index[name, T].cell() if (name, T) in index else "" for T in lengths]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    head = ["variant", "T", "task", "best lr (grid)", "seeds", "mean", "min-max", "std"]
    head += ["converged", "steps to threshold", "step ms", "compiled MiB", "train s", "params"]
    beyond = sorted({int(n) for b in best for r in b.rows for n in r.get("extrapolation") or {}})
    head += [f"at T={n}" for n in beyond]  # the trained models on longer test rows
    md += ["", "Per cell, at its best learning rate:", ""]
    md += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for b in sorted(best, key=lambda b: (b.seq_len, b.task, b.label)):
        grid = ", ".join(f"{lr:g}" for lr in b.rates)
        rate = f"{b.learning_rate:g} ({grid}){'◂' if b.edge else ''}" if b.rates else "-"
        steps = [r["steps_to_threshold"] for r in b.rows if r.get("steps_to_threshold")]
        first = b.rows[0]
        cost = [f"{b.cost:.1f}", f"{(first.get('memory_bytes') or 0) / 2**20:.0f}"]
        train_s = [r.get("train_s") or 0.0 for r in b.rows]
        cells = [b.variant, b.seq_len, b.task, rate, len(b.rows), f"{b.mean:.3f}"]
        cells += [f"{min(b.accuracies):.3f}-{max(b.accuracies):.3f}"]
        cells += [f"{b.std:.3f}" if b.std is not None else "-", f"{b.converged}/{len(b.rows)}"]
        cells += [f"{statistics.fmean(steps):.0f}" if steps else "-", *cost]
        cells += [f"{statistics.fmean(train_s):.0f}", f"{first.get('params') or 0:,}"]
        for n in beyond:
            at = [(r.get("extrapolation") or {}).get(str(n)) for r in b.rows]
            at = [a for a in at if a is not None]  # None: no test rows at that length
            cells.append(f"{statistics.fmean(at):.3f}" if at else "")
        md.append("| " + " | ".join(map(str, cells)) + " |")
    failed = [r for r in rows if r["mode"] == "train_eval" and r["status"] != "ok"]
    for r in failed:
        where = f"{label(r)} T={r['seq_len']} lr={r.get('learning_rate')} seed={r.get('seed')}"
        md.append(f"\n- {where}: {r['status']} ({(r.get('error') or '')[:200]})")
    if any(r.get("task") for r in rows) and save(quality_figure, best, workdir / "quality.png"):
        md += ["", "![quality](quality.png)"]
    if best:
        longest = max(b.seq_len for b in best)
        front = pareto([b for b in best if b.seq_len == longest])
        names = ", ".join(f"{b.label} ({b.mean:.3f}, {b.cost:.1f} ms)" for b in front)
        md += ["", f"Pareto front at T = {longest}, per task (no cell of the task is both more "
                   f"accurate and cheaper per step): {names}."]  # fmt: skip
        if save(central_figure, best, workdir / "central.png"):
            md += ["", "Quality and cost against context length; quality against cost at "
                       f"T = {longest}:", "", "![quality and cost](central.png)"]  # fmt: skip
    return [*md, ""]


def pareto(best: Sequence[Best]) -> list[Best]:
    """Per task, the cells no other cell of the task beats in both accuracy (higher) and step
    time (lower); by task, then cost."""
    point = lambda b: (b.mean, -b.cost)  # noqa: E731  (both: higher is better)

    def beaten(b: Best) -> bool:
        rivals = (o for o in best if o.task == b.task and point(o) != point(b))
        return any(all(x >= y for x, y in zip(point(o), point(b), strict=True)) for o in rivals)

    return sorted((b for b in best if not beaten(b)), key=lambda b: (b.task, b.cost))


def central_figure(best: Sequence[Best]) -> Any:
    """Accuracy (best rate, mean and min-max over seeds) and step time against the context
    length, one colour per variant and one line style per task; then accuracy against step
    time at the longest length, the Pareto front joined."""
    import matplotlib.pyplot as plt

    fig, (quality, cost, trade) = plt.subplots(1, 3, figsize=(14, 4))
    variants = list(dict.fromkeys(b.variant for b in best))
    tasks = list(dict.fromkeys(b.task for b in best))
    styles = ["-", "--", ":", "-."]
    for b_label in dict.fromkeys(b.label for b in best):
        mine = sorted((b for b in best if b.label == b_label), key=lambda b: b.seq_len)
        colour = f"C{variants.index(mine[0].variant) % 10}"
        style = styles[tasks.index(mine[0].task) % len(styles)]
        T = [b.seq_len for b in mine]
        low = [b.mean - min(b.accuracies) for b in mine]
        high = [max(b.accuracies) - b.mean for b in mine]
        quality.errorbar(T, [b.mean for b in mine], yerr=[low, high], color=colour,
                         linestyle=style, marker="o", capsize=2, label=b_label)  # fmt: skip
        cost.plot(T, [b.cost for b in mine], color=colour, linestyle=style, marker="o")
    longest = max(b.seq_len for b in best)
    at = [b for b in best if b.seq_len == longest]
    for b in at:
        colour = f"C{variants.index(b.variant) % 10}"
        trade.scatter(b.cost, b.mean, color=colour)
        trade.annotate(b.label, (b.cost, b.mean), fontsize=6)
    front = pareto(at)
    for i, task in enumerate(dict.fromkeys(b.task for b in front)):
        mine = [b for b in front if b.task == task]
        trade.plot([b.cost for b in mine], [b.mean for b in mine], "k",
                   linestyle=styles[i % len(styles)], linewidth=0.8,
                   label=f"Pareto front {task}".strip())  # fmt: skip
    quality.set(xlabel="context length T", ylabel="accuracy (best lr)", ylim=(-0.02, 1.02))
    cost.set(xlabel="context length T", ylabel="training step (ms)", yscale="log")
    trade.set(xlabel=f"training step at T = {longest} (ms)", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax in (quality, cost):
        ax.set_xscale("log", base=2)
    for ax in (quality, cost, trade):
        ax.grid(True, alpha=0.3)
    quality.legend(fontsize=6)
    trade.legend(fontsize=6)
    fig.tight_layout()
    return fig


def quality_figure(best: Sequence[Best]) -> Any:
    """Accuracy vs the first task field (e.g. num_pairs), one panel per length, one colour per
    variant: every seed's point at the cell's best rate, and the mean through them."""
    import matplotlib.pyplot as plt

    axis = next(k for b in best for k in (b.rows[0].get("task") or {}))
    lengths = sorted({b.seq_len for b in best})
    variants = list(dict.fromkeys(b.label.split(" ")[0] for b in best))
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for ax, T in zip(axes[0], lengths, strict=True):
        for i, variant in enumerate(variants):
            mine = sorted(
                (b for b in best if b.seq_len == T and b.label.split(" ")[0] == variant),
                key=lambda b: b.rows[0]["task"][axis],
            )
            if not mine:
                continue
            x = [b.rows[0]["task"][axis] for b in mine]
            ax.plot(x, [b.mean for b in mine], marker="o", color=f"C{i % 10}", label=variant)
            points = [(b.rows[0]["task"][axis], a) for b in mine for a in b.accuracies]
            ax.scatter(*zip(*points, strict=True), s=12, alpha=0.5, color=f"C{i % 10}")
        ax.set(title=f"T = {T}", xlabel=axis, ylabel="accuracy (best lr)", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
