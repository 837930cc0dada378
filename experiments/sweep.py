"""The context-length sweep: every variant x length x mode, one JSON row per cell.

    python -m experiments.sweep --config=configs/context_sweep.py \
        [--config.variants=blockwise,xla] [--config.lengths=1024,4096] [--workdir=DIR]

Rows are appended to DIR/results.jsonl (default DIR: results/<config name>) as each cell is
measured. Lengths ascend, the baselines first at each. A rerun with the same DIR resumes:
  - it reuses the `ok` and `oom` rows measured by the same code (`git_commit`: the newest
    commit of the code, with a hash of uncommitted changes to it; and `jax_version`); rows of
    other code are measured again unless `--reuse_stale`; `error` and `skipped` cells are tried
    again;
  - a cell that was running when the process died (e.g. killed by the host's out-of-memory
    killer) becomes a `crashed` row, and like an `oom` its variant is not tried at longer
    lengths;
  - a DIR holding rows of another setting (batch, heads, head dim, dtype, causal, segments,
    model, device) is refused: one DIR, one experiment.
Several processes may run the same sweep into one DIR at once (one per core or device): each
claims a cell (DIR/claims/) before measuring it and passes over the cells that another process
has measured or claimed; a claim left by a process that died is a crash, as above.
A cell whose compiled memory exceeds the free memory is `oom` without running. A cell whose
call (extrapolated from shorter lengths) would pass `max_call_s` is only compiled, after the
timed cells, for its memory; cells that would overrun `time_budget_s` are `skipped`, with the
reason. An exception becomes an `error` row. At the end `experiments.report` (re)builds
DIR/report.md, results.csv and scaling.png, and the time tables are printed.
Exit code: 0 when some cell of the sweep has an `ok` row, 1 when none has, 2 for an invalid
config (naming the field) or a DIR of another setting.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import bench, distributed, provenance, report
from experiments.cells import (
    KEY_FIELDS,
    MEASURED,
    Cell,
    MixedRows,
    check_one_setting,
    implementation_of,
    row_key,
)
from experiments.claims import Claims, read_claim
from experiments.configlib import ConfigError, parse_flags
from experiments.kinds import KINDS
from experiments.plan import plan_cells, resolve_dtype, seq_devices

_CONFIG = config_flags.DEFINE_config_file("config", None, "sweep config file (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "results folder; default results/<config name>")
_REUSE_STALE = flags.DEFINE_bool(
    "reuse_stale", False, "reuse rows measured by other code (another git_commit or jax version)"
)
distributed.define_flags()

RESULT_FIELDS = (
    "status",
    "implementation",
    "error",
    "compile_s",
    "time_ms_median",
    "time_ms_min",
    "time_ms_max",
    "repeats",
    "memory_bytes",
    "peak_bytes",
    "useful_flops",
    "gflops",
    "gemm_fraction",
    "tokens_per_s",
)
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def _lane(row: dict[str, Any]) -> str:
    """Cells that differ only in length form a lane; a variant stops growing along it."""
    return json.dumps({f: row.get(f) for f in KEY_FIELDS if f != "seq_len"}, sort_keys=True)


VERSION_FIELDS = ("git_commit", "jax_version")  # a row measured with other values is stale
STOPS_GROWTH = ("oom", "crashed")  # a lane is not tried at longer lengths after these


class Sweep:
    """Runs cells in order, appending a row per cell to `workdir/results.jsonl`.

    Rows already there are reused when they are `ok`, `oom` or `crashed` *and* were measured by
    the same code (VERSION_FIELDS) or `reuse_stale`; other cells are measured (again). Rows of
    another setting (shapes, dtype, device) are refused: raises `MixedRows`.
    """

    def __init__(
        self,
        config: Any,
        cells: list[Cell],
        workdir: Path,
        out: TextIO = sys.stdout,
        reuse_stale: bool = False,
    ):
        self.config, self.cells, self.workdir, self.out = config, cells, workdir, out
        self.device = jax.devices()[0]
        self.path = workdir / "results.jsonl"
        self.claims = Claims(workdir / "claims")  # cells in flight, this process's or others'
        self.reuse_stale, self.read = reuse_stale, -1  # bytes of results.jsonl read so far
        self.costs: list[float] = []  # seconds spent per measured cell, for the ETA
        self.common = {
            "device": f"{self.device.platform}:{self.device.device_kind}",
            **provenance.versions(),
        }
        rows = report.load_rows(self.path)
        planned = [{**cell.fields(), **self.common} for cell in cells]
        check_one_setting([*rows, *planned], f"{self.path} and this sweep's cells")
        self.rows: dict[str, dict[str, Any]] = {}
        self.refresh()
        keys = {row_key(r) for r in rows} - set(self.rows)
        self.stale = sum(cell.key() in keys for cell in cells)  # this sweep's stale cells

    def refresh(self) -> None:
        """The rows of results.jsonl that this sweep may reuse (measured by this code, or any
        with `reuse_stale`), read again when it grew: other processes append to it too."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == self.read:
            return
        version = [self.common[f] for f in VERSION_FIELDS]
        same = lambda r: [r.get(f) for f in VERSION_FIELDS] == version  # noqa: E731
        fresh = [r for r in report.load_rows(self.path) if self.reuse_stale or same(r)]
        self.rows, self.read = {row_key(r): r for r in fresh}, size

    # -- bookkeeping -------------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[row_key(row)] = row  # other processes' rows: `refresh` before each cell

    def row(self, cell: Cell, status: str, error: str | None = None, **values: Any):
        row = {**cell.fields(), **dict.fromkeys(RESULT_FIELDS), **self.common}
        row.update(status=status, error=error, **values)
        return row

    def recover_crash(self) -> None:
        """A cell that a process of this sweep (same code and setting) was measuring when it
        died (its claim is left, and no process has its pid) is recorded as `crashed`, unless it
        has a result by now. A crash of other code gives the cell a fresh try; to retry a
        crashed cell of the same code, delete its row. (`inflight.json`: older versions' claim.)"""
        legacy = self.workdir / "inflight.json"
        left = [(legacy, read_claim(legacy) or {})] if legacy.exists() else []
        planned = {c.key() for c in self.cells}
        for path, cell in [*left, *self.claims.abandoned()]:
            same_code = all(cell.get(f) == self.common[f] for f in VERSION_FIELDS)
            if same_code and row_key(cell) in planned and not self.done_key(row_key(cell)):
                cell = {k: v for k, v in cell.items() if k not in ("pid", "host")}
                row = {**cell, **dict.fromkeys(RESULT_FIELDS), **self.common, "status": "crashed"}
                row["error"] = (
                    "the sweep process died during this cell (killed, e.g. by the host's out-of-"
                    "memory killer); not retried, and longer lengths are skipped"
                )
                self.append(row)
                print(f"recorded a crash: {cell['variant']} T={cell['seq_len']} {cell['mode']}",
                      file=self.out)  # fmt: skip
            path.unlink(missing_ok=True)

    def done(self, cell: Cell) -> bool:
        """Measured already (ok, oom, crashed); `error` and `skipped` cells are tried again."""
        return self.done_key(cell.key())

    def done_key(self, key: str) -> bool:
        return self.rows.get(key, {}).get("status") in MEASURED

    # -- planning ------------------------------------------------------------------------------
    def lane(self, cell: Cell) -> list[dict[str, Any]]:
        lane = _lane(cell.fields())
        rows = [r for r in self.rows.values() if _lane(r) == lane and r["seq_len"] < cell.seq_len]
        return sorted(rows, key=lambda r: r["seq_len"])

    def predict(self, cell: Cell) -> tuple[float, float] | None:
        """(seconds per call, seconds for the cell) extrapolated from shorter lengths along the
        lane: log-log slope of the last two measured lengths, clamped to [1, 3] (2 from one)."""
        ok = [r for r in self.lane(cell) if r["status"] == "ok"]
        if not ok:
            return None
        T1, t1 = ok[-1]["seq_len"], ok[-1]["time_ms_median"] / 1e3
        slope = 2.0
        if len(ok) >= 2:
            T0, t0 = ok[-2]["seq_len"], ok[-2]["time_ms_median"] / 1e3
            slope = math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(T1 / T0)
        call = t1 * (cell.seq_len / T1) ** min(3.0, max(1.0, slope))
        c = self.config
        n = bench.choose_repeats(call, c.cell_budget_s, c.min_repeats, c.max_repeats, c.long_call_s)
        steps = c.train.num_steps if c.kind == "train_eval" else 0  # the training run
        return call, (ok[-1]["compile_s"] or 0.0) + call * (1 + n + steps)

    def compile_cost(self, cell: Cell) -> float:
        """Compile seconds expected at this length (grown linearly from the lane's last)."""
        done = [r for r in self.lane(cell) if r.get("compile_s")]
        if not done:
            return self.mean_cost()
        return done[-1]["compile_s"] * cell.seq_len / done[-1]["seq_len"]

    def decide(self, cell: Cell, elapsed: float) -> tuple[str, str | None]:
        """("time" | "memory" | "skip", reason). A cell whose call would pass `max_call_s` is
        only compiled, for its memory (and oom prediction), after all timed cells; none is
        tried after an oom or a crash; none starts that would overrun `time_budget_s`."""
        stop = [r for r in self.lane(cell) if r["status"] in STOPS_GROWTH]
        if stop:
            return "skip", f"stopped growing: {stop[-1]['status']} at T={stop[-1]['seq_len']}"
        predicted = self.predict(cell)
        c, left = self.config, self.config.time_budget_s - elapsed
        if predicted and predicted[0] > c.max_call_s:
            reason = (
                f"not timed: predicted {predicted[0]:.0f} s per call > max_call_s={c.max_call_s:g}"
            )
            if c.time_budget_s and self.compile_cost(cell) > left:
                return "skip", reason + "; no time left to compile"
            return "memory", reason
        cost = predicted[1] if predicted else self.mean_cost()
        if c.time_budget_s and cost > left:
            return "skip", f"time budget: cell predicted {cost:.0f} s, {max(left, 0):.0f} s left"
        return "time", None

    def mean_cost(self) -> float:
        return sum(self.costs) / len(self.costs) if self.costs else 1.0

    def eta(self, remaining: list[Cell], elapsed: float) -> float:
        total = 0.0
        for cell in remaining:
            predicted = self.predict(cell)
            if predicted is None:
                total += self.mean_cost()
            elif predicted[0] <= self.config.max_call_s:
                total += predicted[1]
            else:
                total += self.compile_cost(cell)
        budget = self.config.time_budget_s
        return max(0.0, min(total, budget - elapsed)) if budget else total

    # -- measuring -----------------------------------------------------------------------------
    def measure(self, cell: Cell, gemm_gflops: float, why_untimed: str | None = None) -> dict:
        """Builds, compiles, checks memory and times one cell (or, given `why_untimed`, stops
        after the memory analysis: a `skipped` row with memory); never raises but Ctrl-C."""
        c = self.config
        try:
            built = KINDS[cell.kind](cell, c)
            implementation = implementation_of(cell)  # before compiling: "auto" may time rivals
            compiled, compile_s = bench.compile_timed(built.fn, *built.args, carry=built.carry)
            memory = bench.compiled_memory(compiled)
            values = {"compile_s": compile_s, "useful_flops": built.useful_flops, **built.fields}
            values["implementation"] = implementation
            values["memory_bytes"] = memory.total if memory else None
            free = bench.free_memory_bytes(self.device)
            if memory and free is not None and memory.to_allocate > c.memory_fraction * free:
                need, have = memory.to_allocate / bench.GiB, free / bench.GiB
                error = f"predicted: needs {need:.2f} GiB, {have:.2f} GiB free"
                return self.row(cell, "oom", error, **values)
            if why_untimed:
                return self.row(cell, "skipped", why_untimed, **values)
            timing, peak = bench.time_calls(
                bench.chained(compiled, built.args, built.carry),
                budget_s=c.cell_budget_s,
                min_repeats=c.min_repeats,
                max_repeats=c.max_repeats,
                long_call_s=c.long_call_s,
                device=self.device,
            )
        except Exception as e:  # noqa: BLE001  (one bad cell must not stop the sweep)
            message = f"{type(e).__name__}: {e}"[:2000]
            status = "oom" if any(m in message for m in OOM_MARKERS) else "error"
            return self.row(cell, status, message)
        seconds = timing.median_ms / 1e3
        gflops = built.useful_flops / seconds / 1e9 if built.useful_flops else None
        if built.quality:  # a train_eval cell: train and evaluate after timing the step
            try:
                values.update(built.quality(self.workdir, self.out))
            except Exception as e:  # noqa: BLE001  (one bad cell must not stop the sweep)
                return self.row(cell, "error", f"{type(e).__name__}: {e}"[:2000], **values)
        values.update(
            time_ms_median=timing.median_ms,
            time_ms_min=timing.min_ms,
            time_ms_max=timing.max_ms,
            repeats=timing.repeats,
            peak_bytes=peak,
            gflops=gflops,
            gemm_fraction=gflops / gemm_gflops if gflops and gemm_gflops else None,
            tokens_per_s=built.tokens / seconds,
        )
        return self.row(cell, "ok", **values)

    def run(self) -> float:
        """Runs every cell not yet done; returns the GEMM rate (GFLOP/s) it measured."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.recover_crash()
        start = time.perf_counter()
        dtype = jax.numpy.dtype(self.cells[0].dtype if self.cells else jax.numpy.float32)
        size = self.config.gemm_size or (2048 if self.device.platform == "cpu" else 8192)
        gemm = bench.gemm_gflops(size, dtype, device=self.device)
        print(
            f"GEMM {size}^3 {dtype.name} on {self.common['device']}: {gemm:.1f} GFLOP/s",
            file=self.out,
            flush=True,
        )
        todo = [cell for cell in self.cells if not self.done(cell)]
        if len(todo) < len(self.cells):
            print(f"resuming: {len(self.cells) - len(todo)} cells already done", file=self.out)
        if self.stale:
            print(
                f"{self.stale} cells have rows in {self.path} measured by other code (git_commit "
                "or jax_version differs): measured again (--reuse_stale keeps those rows)",
                file=self.out,
            )
        deferred: list[Cell] = []  # compiled for memory only, after every timed cell
        # A live bar (current cell, elapsed, predicted time left) on a terminal; one line per
        # cell in every case, so logs show the progress too.
        bar = tqdm.tqdm(
            total=len(todo),
            file=self.out,
            disable=None,  # off when `out` is not a terminal
            leave=False,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        finished: set[str] = set()
        with bar:
            for phase in (todo, deferred):
                for cell in phase:
                    self.refresh()
                    if self.done(cell) or not self.claims.take(
                        cell.key(), {**cell.fields(), **self.common}
                    ):  # measured or being measured by another process
                        finished.add(cell.key())
                        bar.update(1)
                        continue
                    action, reason = self.decide(cell, time.perf_counter() - start)
                    if action == "memory" and phase is todo:
                        self.claims.release()
                        deferred.append(cell)
                        continue
                    if action == "skip":
                        row = self.row(cell, "skipped", reason)
                    else:
                        bar.set_description(f"{cell.variant} T={cell.seq_len} {cell.mode}")
                        t0 = time.perf_counter()
                        row = self.measure(cell, gemm, reason)
                        self.costs.append(time.perf_counter() - t0)
                        gc.collect()
                    self.append(row)
                    self.claims.release()
                    elapsed = time.perf_counter() - start
                    finished.add(cell.key())
                    eta = self.eta([c for c in todo if c.key() not in finished], elapsed)
                    left = tqdm.tqdm.format_interval(eta)
                    bar.set_postfix_str(f"~{left} left, predicted", refresh=False)
                    bar.update(1)
                    line = progress_line(len(finished), len(todo), elapsed, eta, row)
                    bar.write(line, file=self.out)
                    self.out.flush()
        return gemm


def progress_line(i: int, n: int, elapsed: float, eta: float, row: dict[str, Any]) -> str:
    clock = tqdm.tqdm.format_interval
    head = f"[{i:>3}/{n} {clock(elapsed)} eta {clock(eta)}]"
    task = "".join(f" {k}={v}" for k, v in (row.get("task") or {}).items())
    if row.get("seed") is not None:
        task += f" lr={row['learning_rate']:g} seed={row['seed']}"
    cell = f"{row['variant']:<14} T={row['seq_len']:<6}{task} {row['mode']:<10} {row['status']:<7}"
    if row["status"] != "ok":
        mem = f" ({row['memory_bytes'] / 2**20:.0f} MiB)" if row.get("memory_bytes") else ""
        return f"{head} {cell} {row['error'] or ''}{mem}"
    mem = (row["memory_bytes"] or 0) / 2**20
    rate = f"{row['gflops']:7.1f} GFLOP/s" if row["gflops"] else ""
    if row.get("accuracy") is not None:
        rate += f"  accuracy {row['accuracy']:.3f} (trained {row['train_s']:.0f} s)"
    timing = f"{row['time_ms_median']:10.1f} ms x{row['repeats']}"
    return f"{head} {cell} {timing}  compile {row['compile_s']:5.1f} s  {mem:8.0f} MiB  {rate}"


def run(
    config: Any,
    workdir: Path,
    command: str,
    out: TextIO = sys.stdout,
    reuse_stale: bool = False,
) -> int:
    """Validates `config`, runs the sweep into `workdir` and writes the report; returns how
    many of the sweep's cells have an `ok` row. Raises ConfigError for an invalid config and
    MixedRows when the workdir holds rows of another setting."""
    dtype = resolve_dtype(config.dtype, jax.devices()[0].platform)
    cells = plan_cells(config, dtype)  # head_dim 0 resolves there, per backend
    sweep = Sweep(config, cells, workdir, out, reuse_stale)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    try:
        gemm = sweep.run()
    finally:
        sweep.claims.release()
    meta = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "gemm_gflops": gemm,
        "gemm_size": config.gemm_size or (2048 if sweep.device.platform == "cpu" else 8192),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "platform": platform.platform(),
        "config": config.to_dict(),
        **sweep.common,
    }
    report.append_meta(workdir, meta)
    path = report.write_report(workdir)
    print(report.terminal_tables(report.load_rows(workdir / "results.jsonl")), file=out)
    print(f"wrote {path} and its tables and plot ({meta['wall_s']:.0f} s)", file=out)
    return sum(sweep.rows.get(cell.key(), {}).get("status") == "ok" for cell in cells)


def _fail(message: str) -> None:
    print(f"invalid config: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.ERROR)  # libraries' info and warnings (orbax, TFDS) stay quiet
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        _fail("--config=configs/<name>.py is required")
    try:
        config.keys()  # a config file that failed to load raises here
    except (OSError, AttributeError) as e:
        _fail(str(e))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill is not a crashed cell
    try:  # a mesh on a CPU host: simulated devices, asked for before JAX starts its backend
        devices = seq_devices(config)[-1]
    except ConfigError as e:
        _fail(str(e))
    if devices > 1:
        flag = f"--xla_force_host_platform_device_count={devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = Path(_WORKDIR.value or Path("results") / name)
    distributed.initialize_from_flags()  # several hosts: before anything touches the devices
    if jax.process_index():  # one writer: the other processes keep their rows apart
        workdir = workdir / f"process_{jax.process_index()}"
    command = " ".join(["python -m experiments.sweep", *sys.argv[1:]])
    try:
        ok = run(config, workdir, command, reuse_stale=_REUSE_STALE.value)
    except ConfigError as e:
        _fail(str(e))
    except MixedRows as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    if not ok:
        print("no cell of this sweep ran successfully (see the errors above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
