"""Sweep reports: tables, log-log fits, crossovers, CSV and plot; and a regression guard.

    python -m experiments.report results/context_sweep          # (re)build report.md & co.
    python -m experiments.report --compare OLD.jsonl NEW.jsonl [--threshold 0.1]
    python -m experiments.report runs/    # training workdirs under runs/: runs.md & co.

`--compare` prints new/old time ratios per cell and exits 1 when any cell got slower by more
than the threshold (or stopped running), so kernel changes can be guarded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.cells import (
    KEY_FIELDS,
    MEASURED,
    SETTING_FIELDS,
    MixedRows,
    check_one_setting,
    row_key,
    setting,
    with_new_fields,
)
from experiments.plots import save_figure
from experiments.quality_report import quality_section
from experiments.runs_report import write_runs_report

Row = dict[str, Any]
SHORT = {"oom": "oom", "error": "err", "skipped": "skip", "crashed": "crash"}
LEGEND = (
    "Cells: `oom` (predicted from the compiled memory, or real), `crash` (the process died "
    "during the cell, e.g. killed by the host's out-of-memory killer), `skip` (not run; the "
    "reason is in results.csv `error`), `err`. A skipped or oom cell that was compiled shows "
    "its memory. Memory is XLA's compiled temp + arguments + outputs; the runtime peak is "
    "results.csv `peak_bytes` (CPU: the operating system's record of the process's peak resident "
    "set during the warm-up call, above what was resident before it; GPU/TPU: the allocator's "
    "peak, known only when the call raised the process's peak, else empty)."
)


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a results.jsonl (a workdir also works); the last row of each cell wins, but a
    `skipped` row (nothing measured) never hides a measured one (ok, oom, crashed), e.g. of
    older code that a later sweep's budget left unmeasured. A torn last line (a crash
    mid-write) is ignored."""
    path = Path(path)
    path = path / "results.jsonl" if path.is_dir() else path
    rows: dict[str, Row] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        try:
            row = with_new_fields(json.loads(line))
        except json.JSONDecodeError:
            continue
        key = row_key(row)
        if row.get("status") == "skipped" and rows.get(key, {}).get("status") in MEASURED:
            continue
        rows.pop(key, None)
        rows[key] = row
    return list(rows.values())


def append_meta(workdir: Path, meta: dict[str, Any]) -> None:
    """Adds one sweep invocation (machine, GEMM rate, wall time, config) to meta.json."""
    path = workdir / "meta.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.write_text(json.dumps({"runs": [*runs, meta]}, indent=1, default=str))


def _meta(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "meta.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


# -- analysis ----------------------------------------------------------------------------------
def _label(row: Row) -> str:
    """Variant name, plus options where one variant appears with several option sets, plus
    the task fields of a train_eval cell (e.g. ` num_pairs=8`)."""
    devices = f" @{row['devices']}dev" if row.get("devices") else ""
    return row["variant"] + row.get("_suffix", "") + _task(row) + devices


def _task(row: Row) -> str:
    """The task fields as the config wrote them (`num_pairs=L/16`), else their values."""
    return "".join(f" {k}={v}" for k, v in (row.get("task_spec") or row.get("task") or {}).items())


def _version(row: Row) -> tuple[Any, Any]:
    """The code that measured a row (or a sweep run): its git commit and jax version."""
    return row.get("git_commit"), row.get("jax_version")


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _index(rows: Sequence[Row]) -> dict[tuple[str, str, int], Row]:
    return {(_label(r), r["mode"], r["seq_len"]): r for r in rows}


def _tag_options(rows: list[Row]) -> list[Row]:
    by_variant: dict[str, set[str]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], set()).add(json.dumps(r["options"], sort_keys=True))
    out = []
    for r in rows:
        r = dict(r)
        if len(by_variant[r["variant"]]) > 1:
            r["_suffix"] = "(" + ",".join(f"{k}={v}" for k, v in r["options"].items()) + ")"
        out.append(r)
    return out


@dataclasses.dataclass(frozen=True)
class Fit:
    """Least-squares slope of log(y) on log(T) over lengths lo..hi (n points)."""

    slope: float
    lo: int
    hi: int
    n: int

    def __str__(self) -> str:
        return f"{self.slope:.2f} ({self.lo}-{self.hi}, {self.n} pts)"


def fit_exponent(points: Iterable[tuple[int, float]], span: int = 8) -> Fit | None:
    """Log-log slope over the longest lengths (those >= max length / `span`, the top four
    doublings by default), where fixed overheads matter least. None with fewer than 2 points."""
    pts = sorted((T, y) for T, y in points if y and y > 0)
    if not pts:
        return None
    pts = [(T, y) for T, y in pts if T >= pts[-1][0] / span]
    if len({T for T, _ in pts}) < 2:
        return None
    lengths, values = np.array(pts, dtype=np.float64).T
    slope, _ = np.polyfit(np.log(lengths), np.log(values), 1)
    return Fit(float(slope), pts[0][0], pts[-1][0], len(pts))


def _series(rows: Sequence[Row], label: str, mode: str, field: str) -> list[tuple[int, float]]:
    return sorted(
        (r["seq_len"], r[field])
        for r in rows
        if _label(r) == label and r["mode"] == mode and r["status"] == "ok" and r.get(field)
    )


def crossover(rows: Sequence[Row], label: str, baseline: str, mode: str) -> str:
    """From which length `label` is faster than `baseline` (at every common length from there)."""
    a = dict(_series(rows, label, mode, "time_ms_median"))
    b = dict(_series(rows, baseline, mode, "time_ms_median"))
    common = sorted(set(a) & set(b))
    beyond = [T for T in a if b and T > max(b)]
    note = f"; {baseline} did not run at {beyond[0]}+" if beyond else ""
    if not common:
        return "n/a" + note
    if a[common[-1]] >= b[common[-1]]:
        return f"slower at {common[-1]}" + note
    start = common[-1]
    for T in reversed(common):
        if a[T] >= b[T]:
            break
        start = T
    return ("all" if start == common[0] else f">= {start}") + note


def longest_fit(rows: Sequence[Row], label: str, mode: str) -> str:
    lane = sorted(
        (r for r in rows if _label(r) == label and r["mode"] == mode), key=lambda r: r["seq_len"]
    )
    ok = [r["seq_len"] for r in lane if r["status"] == "ok"]
    text = str(max(ok)) if ok else "none"
    after = [r for r in lane if r["seq_len"] > (max(ok) if ok else 0) and r["status"] != "ok"]
    return text + (f" (then {after[0]['status']} at {after[0]['seq_len']})" if after else "")


# -- tables -------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def table(rows: Sequence[Row], mode: str, field: str, scale: float = 1.0) -> str:
    """Markdown table of `field` (divided by `scale`): rows variants, columns lengths."""
    rows = [r for r in rows if r["mode"] == mode]
    lengths = sorted({r["seq_len"] for r in rows})
    index = _index(rows)
    lines = ["| variant | " + " | ".join(map(str, lengths)) + " |"]
    lines.append("|---" * (len(lengths) + 1) + "|")
    for label in _ordered(_label(r) for r in rows):
        cells = []
        for T in lengths:
            r = index.get((label, mode, T))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                value = r.get(field) if field == "memory_bytes" else None
                shown = f" {_num(value / scale)}" if value else ""
                cells.append(SHORT[r["status"]] + shown + r.get("_mark", ""))
            else:
                value = _num(r[field] / scale) if r.get(field) is not None else "?"
                cells.append(value + r.get("_mark", ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relative_table(rows: Sequence[Row], mode: str, baseline: str) -> str:
    """Speed-up over `baseline` per length (baseline time / variant time)."""
    base = dict(_series(rows, baseline, mode, "time_ms_median"))
    rel = []
    for r in rows:
        if r["mode"] == mode and r["status"] == "ok" and r["seq_len"] in base:
            rel.append({**r, "speedup": base[r["seq_len"]] / r["time_ms_median"]})
    return table(rel, mode, "speedup") if rel else "(no common lengths)"


def lra_layout(rows: Sequence[Row], mode: str, baseline: str) -> str:
    """Long Range Arena Table 2 layout: steps/s with the speed-up over `baseline` in brackets,
    then compiled memory (GiB; LRA's table shows the runtime peak), per length."""
    rows = [r for r in rows if r["mode"] == mode]
    lengths = sorted({r["seq_len"] for r in rows})
    index = _index(rows)
    base = dict(_series(rows, baseline, mode, "time_ms_median"))
    head = [f"steps/s {T}" for T in lengths] + [f"compiled GiB {T}" for T in lengths]
    lines = ["| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label in _ordered(_label(r) for r in rows):
        speed, memory = [], []
        for T in lengths:
            r = index.get((label, mode, T))
            if r is None or r["status"] != "ok":
                speed.append(SHORT[r["status"]] if r else "")
                memory.append("")
                continue
            ratio = f" ({base[T] / r['time_ms_median']:.1f}x)" if T in base else ""
            speed.append(f"{1e3 / r['time_ms_median']:.2f}{ratio}")
            memory.append(f"{r['memory_bytes'] / 2**30:.2f}" if r.get("memory_bytes") else "?")
        lines.append(f"| {label} | " + " | ".join(speed + memory) + " |")
    return "\n".join(lines)


def terminal_tables(rows: Sequence[Row]) -> str:
    rows = _tag_options(list(rows))
    out = []
    for mode in _ordered(r["mode"] for r in rows):
        out += [f"\n{mode}: median time (ms)", table(rows, mode, "time_ms_median")]
    return "\n".join(out)


def write_report(workdir: str | Path) -> Path:
    """Writes report.md, results.csv and scaling.png in `workdir` from its results.jsonl.
    Raises MixedRows when the rows are of different settings (shapes, dtype, device)."""
    workdir = Path(workdir)
    rows = load_rows(workdir)
    check_one_setting(rows, str(workdir / "results.jsonl"))
    runs = _meta(workdir)
    latest = _version(runs[-1] if runs else rows[-1]) if rows else None
    rows = [{**r, "_mark": "†"} if _version(r) != latest else r for r in _tag_options(rows)]
    write_csv(rows, workdir / "results.csv")
    plotted = plot(rows, workdir / "scaling.png")
    config = runs[-1]["config"] if runs else {}
    baselines = [b.strip() for b in str(config.get("baselines", "xla,blockwise")).split(",")]
    labels = _ordered(_label(r) for r in rows)
    modes = _ordered(r["mode"] for r in rows)
    md = [f"# Sweep report: {workdir.name}", ""]
    if rows:
        shown = ", ".join(f"{f}={json.loads(v)}" for f, v in setting(rows[0]) if v != "null")
        md += [f"Setting of every row: {shown}.", ""]
        ran = implementations(rows)
        if ran:
            md += [f"Implementations that ran (the registry's choice per call): {ran}.", ""]
    for run in runs:
        md.append(
            f"- `{run['command']}` on {run['started']}: {run['wall_s']:.0f} s wall; "
            f"{run['device']} ({run['machine']}; {run['platform']}); jax {run['jax_version']}; "
            f"commit {run['git_commit']}; GEMM {run['gemm_size']}^3 at "
            f"{run['gemm_gflops']:.1f} GFLOP/s"
        )
    md.append(f"- report built {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    versions = Counter(_version(r) for r in rows)
    if len(versions) > 1:
        counts = ", ".join(f"{c} with jax {j} ({n} rows)" for (c, j), n in versions.most_common())
        md.append(
            f"- **rows measured by different code**: {counts}; cells marked † were measured by "
            f"other code than the latest run ({latest[0]}, jax {latest[1]})"
        )
    md += ["", LEGEND, ""]
    rates = [r["gflops"] for r in rows if r.get("gflops")]  # one unit for the whole report
    unit, per = ("TFLOP/s", 1e3) if max(rates, default=0) >= 1e3 else ("GFLOP/s", 1.0)
    for mode in modes:
        md += [f"## {mode}", "", "Median time (ms):", "", table(rows, mode, "time_ms_median"), ""]
        md += ["Compiled memory (MiB):", "", table(rows, mode, "memory_bytes", 2**20), ""]
        md += [f"Useful {unit}:", "", table(rows, mode, "gflops", per), ""]
        md += ["Fraction of the same-run GEMM rate:", "", table(rows, mode, "gemm_fraction"), ""]
        if baselines and baselines[0] in labels:
            md += [f"Speed-up over `{baselines[0]}` (its time / this time):", ""]
            md += [relative_table(rows, mode, baselines[0]), ""]
            if mode == "train_step":
                md += [f"Long Range Arena layout (speed-up over `{baselines[0]}`):", ""]
                md += [lra_layout(rows, mode, baselines[0]), ""]
    if any(r.get("accuracy") is not None for r in rows):
        md += quality_section(rows, workdir, _label, save_figure)
    if any(r["mode"] == "decode" for r in rows):
        md += decode_section(rows)
    if any(r.get("devices") for r in rows):
        md += mesh_section(rows, baselines[0] if baselines else None)
    md += [
        "## Scaling",
        "",
        "Log-log slopes over the longest lengths (1 = O(T), 2 = O(T^2));",
        "crossover = from which length a variant is faster than the baseline.",
        "",
    ]
    header = ["variant", "mode", "time slope", "memory slope", "longest that ran"]
    header += [f"faster than {b}" for b in baselines]
    md += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label in labels:
        for mode in modes:
            t = fit_exponent(_series(rows, label, mode, "time_ms_median"))
            m = fit_exponent(_series(rows, label, mode, "memory_bytes"))
            cells = [label, mode, str(t or "-"), str(m or "-"), longest_fit(rows, label, mode)]
            cells += ["-" if b == label else crossover(rows, label, b, mode) for b in baselines]
            md.append("| " + " | ".join(cells) + " |")
    md += ["", "![scaling](scaling.png)" if plotted else "(no plot: matplotlib is not installed)"]
    path = workdir / "report.md"
    path.write_text("\n".join(md))
    return path


def decode_section(rows: Sequence[Row]) -> list[str]:
    """Time per generated token and cache memory by the number of cached tokens T, with their
    fitted exponents (about 1 for a KV cache, 0 for window and recurrent caches)."""
    rows = [
        {**r, "ms_per_token": r["time_ms_median"] / r["decode_steps"]}
        if r.get("time_ms_median") is not None and r.get("decode_steps")
        else r
        for r in rows
        if r["mode"] == "decode"
    ]
    md = ["## Decoding", "", "Time per generated token after T cached tokens (ms):", ""]
    md += [table(rows, "decode", "ms_per_token"), "", "Cache memory (MiB, all layers):", ""]
    md += [table(rows, "decode", "cache_bytes", 2**20), ""]
    md += ["| variant | time per token slope | cache slope |", "|---|---|---|"]
    for label in _ordered(_label(r) for r in rows):
        t = fit_exponent(_series(rows, label, "decode", "ms_per_token"))
        m = fit_exponent(_series(rows, label, "decode", "cache_bytes"))
        md.append(f"| {label} | {t or '-'} | {m or '-'} |")
    return [*md, ""]


def implementations(rows: Sequence[Row]) -> str:
    """`variant`: the implementations its rows ran (e.g. "`xla`: cudnn; `blockwise`: jax")."""
    ran: dict[str, list[str]] = {}
    for r in rows:
        if r.get("implementation"):
            ran.setdefault(_label(r), [])
            if r["implementation"] not in ran[_label(r)]:
                ran[_label(r)].append(r["implementation"])
    return "; ".join(f"`{label}`: {', '.join(names)}" for label, names in ran.items())


def mesh_section(rows: Sequence[Row], baseline: str | None) -> list[str]:
    """Mesh-aware variants (`ring`) by the number of devices on the `seq` axis, at each T:
    compiled memory per device against 1 device, time against the first baseline on one
    device, and the causal work imbalance (busiest device / mean)."""
    md = ["## Sequence parallelism", ""]
    md += ["Simulated devices share the host's cores: the times measure the ring's overhead, "]
    md[-1] += "not a speed-up. Memory is per device (XLA's compiled analysis)."
    ringed = {r["variant"] + r.get("_suffix", "") for r in rows if r.get("devices")}
    head = "| mode | T | variant | devices | MiB per device | x 1 device | time ms | x baseline "
    md += ["", head + "| imbalance |", "|---" * 9 + "|"]
    by = {(r["variant"] + r.get("_suffix", ""), r["mode"], r["seq_len"], r.get("devices") or 1): r
          for r in rows}  # fmt: skip
    for (variant, mode, T, n), r in sorted(by.items(), key=lambda kv: kv[0][1:] + kv[0][:1]):
        if variant not in ringed:
            continue
        one = by.get((variant, mode, T, 1), {})
        base = by.get((baseline or variant, mode, T, 1), {})

        def ratio(a, b):
            return f"{a / b:.3f}" if a and b else "-"

        mem, ms = r.get("memory_bytes"), r.get("time_ms_median")
        cells = [mode, T, variant, n, f"{mem / 2**20:.1f}" if mem else "-",
                 ratio(mem, one.get("memory_bytes")), f"{ms:.1f}" if ms else "-",
                 ratio(ms, base.get("time_ms_median")), r.get("imbalance", "-")]  # fmt: skip
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    return [*md, ""]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    fields = _ordered(k for r in rows for k in r if not k.startswith("_"))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()}
            )


def plot(rows: Sequence[Row], path: Path) -> bool:
    """Saves `figure(rows)` to `path`; False when matplotlib is not installed."""
    return save_figure(figure, rows, path)


def figure(rows: Sequence[Row]) -> Any:
    """Two log-log panels, time and compiled memory vs length, with O(T), O(T^2) guides: one
    colour per variant, one line style per mode, and a legend for each."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = _ordered(_label(r) for r in rows)
    modes = _ordered(r["mode"] for r in rows)
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20").colors
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    styles = dict(zip(modes, ["-", "--", ":", "-."] * len(modes), strict=False))
    panels = (("time_ms_median", "median time (ms)"), ("memory_bytes", "compiled memory (bytes)"))
    for ax, (field, name) in zip(axes, panels, strict=True):
        for label in labels:
            for mode in modes:
                pts = _series(rows, label, mode, field)
                if pts:
                    ax.plot(*zip(*pts, strict=True), styles[mode], marker="o", ms=3,
                            color=colours[label])  # fmt: skip
        ys = [r[field] for r in rows if r["status"] == "ok" and r.get(field)]
        lengths = sorted({r["seq_len"] for r in rows if r["status"] == "ok"})
        if ys and len(lengths) > 1:
            lo, hi = lengths[0], lengths[-1]
            y0 = sorted(ys)[len(ys) // 4]
            for power, text in ((1, "O(T)"), (2, "O(T²)")):
                ax.plot([lo, hi], [y0, y0 * (hi / lo) ** power], ":", color="gray", lw=1)
                ax.annotate(text, (hi, y0 * (hi / lo) ** power), color="gray", fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="context length T", ylabel=name)
        ax.grid(True, which="both", alpha=0.3)
    variant_keys = [Line2D([], [], color=colours[v], marker="o", ms=3) for v in labels]
    mode_keys = [Line2D([], [], color="black", linestyle=styles[m]) for m in modes]
    axes[0].add_artist(axes[0].legend(variant_keys, labels, title="variant", fontsize=7,
                                      loc="upper left"))  # fmt: skip
    axes[0].legend(mode_keys, modes, title="mode", fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# -- regression guard ---------------------------------------------------------------------------
def _pair_rows(old: Sequence[Row], new: Sequence[Row]) -> list[tuple[Row, Row | None]]:
    """Pairs each old row with its new row: same cell, or else the same cell but for its
    options (a retuned default tile size) when that match is unique on both sides. A key field
    that one file's rows lack (rows written before the field existed) is not compared."""
    fields = tuple(f for f in KEY_FIELDS if all(f in r for r in [*old, *new]) or f == "model")
    by_key = {row_key(r, fields): r for r in new}
    loose = lambda r: row_key({**r, "options": None}, fields)  # noqa: E731
    counts: dict[str, int] = {}
    for r in [*old, *new]:
        counts[loose(r)] = counts.get(loose(r), 0) + 1
    by_loose = {loose(r): r for r in new if counts[loose(r)] == 2}
    return [(o, by_key.get(row_key(o, fields)) or by_loose.get(loose(o))) for o in old]


def compare(old: Sequence[Row], new: Sequence[Row], threshold: float) -> tuple[list[str], bool]:
    """Per-cell new/old median-time ratios; True (a failure) when a cell slowed by more than
    `threshold`, stopped running (ok before, not ok or missing now), or nothing was compared."""
    lines, worse, compared, seen = [], False, 0, set()
    lines.append(f"{'variant':<16}{'mode':<11}{'T':>7}{'old ms':>11}{'new ms':>11}{'ratio':>8}")
    for o, n in _pair_rows(old, new):
        cell = f"{o['variant']:<16}{o['mode']:<11}{o['seq_len']:>7}"
        if n is None:
            worse |= o["status"] == "ok"
            lines.append(f"{cell}  only in old" + ("  WORSE" if o["status"] == "ok" else ""))
            continue
        seen.add(id(n))
        if o["status"] == "ok" and n["status"] == "ok":
            compared += 1
            ratio = n["time_ms_median"] / o["time_ms_median"]
            flag = "  SLOWER" if ratio > 1 + threshold else ""
            worse |= bool(flag)
            times = f"{o['time_ms_median']:>11.2f}{n['time_ms_median']:>11.2f}"
            lines.append(f"{cell}{times}{ratio:>8.2f}{flag}")
        elif o["status"] == "ok":
            worse = True
            lines.append(f"{cell}  was ok, now {n['status']}: {n.get('error')}  WORSE")
        else:
            lines.append(f"{cell}  {o['status']} -> {n['status']}")
    lines += [
        f"{'':<16}{'':<11}  only in new: {r['variant']} {r['mode']} {r['seq_len']}"
        for r in new
        if id(r) not in seen
    ]
    if not compared:
        lines.append("no cell ran in both files: nothing was compared  WORSE")
    return lines, worse or not compared


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workdir", nargs="?", help="sweep workdir whose report to (re)build")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="two results.jsonl")
    parser.add_argument("--threshold", type=float, default=0.1, help="allowed slow-down (0.1)")
    args = parser.parse_args(argv)
    if args.compare:
        old, new = (load_rows(p) for p in args.compare)
        for p, rows in zip(args.compare, (old, new), strict=True):
            if not rows:
                parser.error(f"no rows in {p}")
        shared = [f for f in SETTING_FIELDS if all(f in r for r in [*old, *new])]
        try:  # a field one file lacks (written before it existed) is not compared
            check_one_setting([{f: r[f] for f in shared} for r in [*old, *new]], "OLD and NEW")
        except MixedRows as e:
            parser.error(f"not comparable: {e}")
        lines, worse = compare(old, new, args.threshold)
        print("\n".join(lines))
        bad = sum(line.endswith(("SLOWER", "WORSE")) for line in lines)
        verdict = "FAIL" if worse else "OK"
        print(f"{verdict}: {bad} cell(s) slower by more than {args.threshold:.0%} or failing")
        return 1 if worse else 0
    if not args.workdir:
        parser.error("give a workdir or --compare OLD NEW")
    if not load_rows(args.workdir):  # not a sweep: a folder of training runs?
        try:
            print(f"wrote {write_runs_report(args.workdir, save_figure)}")
        except ValueError as e:
            parser.error(f"no results.jsonl rows in {args.workdir}, and {e}")
        return 0
    try:
        print(f"wrote {write_report(args.workdir)}")
    except MixedRows as e:
        print(f"no report: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
