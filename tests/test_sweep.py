"""The sweep harness: end to end on a tiny config, oom prediction, error rows, caps, resume,
crash recovery and config validation (exit code 2 naming the field)."""

import importlib
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import experiments.kinds as kinds
from configs import tiny_sweep
from experiments import bench, cells, plan, provenance, report, sweep
from experiments.claims import Claims
from experiments.configlib import ConfigError

ROW_FIELDS = {
    "variant", "options", "seq_len", "batch", "heads", "kv_heads", "head_dim", "dtype", "mode",
    "causal", "segments", "status", "implementation", "error", "compile_s", "time_ms_median",
    "time_ms_min", "time_ms_max", "repeats",
    "memory_bytes", "peak_bytes", "useful_flops", "gflops", "gemm_fraction", "tokens_per_s",
    "device", "jax_version", "git_commit",
}  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def tiny(**changes):
    config = tiny_sweep.get_config()
    config.update(changes)
    return config


def run(config, workdir, reuse_stale=False):
    out = io.StringIO()
    sweep.run(config, workdir, "test", out=out, reuse_stale=reuse_stale)
    return report.load_rows(workdir), out.getvalue()


def lines(workdir):
    return (workdir / "results.jsonl").read_text().splitlines()


def test_tiny_sweep_end_to_end_then_resume(tmp_path):
    rows, out = run(tiny(lengths="64"), tmp_path)
    assert len(rows) == 2 * 2  # variants x modes
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["status"] == "ok", row["error"]
        assert row["time_ms_min"] <= row["time_ms_median"] <= row["time_ms_max"]
        assert 2 <= row["repeats"] <= 3
        assert row["memory_bytes"] > 0 and row["compile_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["seq_len"] / row["time_ms_median"] * 1e3)
        spec = av.spec(row["variant"])
        fwd = spec.flops(1, row["seq_len"], row["seq_len"], 2, 16, causal=True, **row["options"])
        factor = 1.0 if row["mode"] == "fwd" else 3.5
        assert row["useful_flops"] == pytest.approx(factor * fwd)
    assert {(r["heads"], r["kv_heads"]) for r in rows} == {(2, 1)}
    assert "fwd_bwd: median time (ms)" in out and "GEMM 256^3" in out
    ran = {r["variant"]: r["implementation"] for r in rows}  # "auto" resolved on this CPU
    assert ran == {"xla": "xla", "blockwise": "jax"}
    assert "| blockwise |" in (tmp_path / "report.md").read_text()
    assert (
        "Implementations that ran (the registry's choice per call): `xla`: xla; `blockwise`: jax"
        in (tmp_path / "report.md").read_text()
    )
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 4
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun with the same workdir measures nothing and appends nothing.
    before = lines(tmp_path)
    _, out = run(tiny(lengths="64"), tmp_path)
    assert "resuming: 4 cells already done" in out
    assert lines(tmp_path) == before
    assert len(json.loads((tmp_path / "meta.json").read_text())["runs"]) == 2


def fake_measure(ms_of_cell, calls):
    """A stand-in for Sweep.measure: an ok row whose time is ms_of_cell(cell), no compiling."""

    def measure(self, cell, gemm, why_untimed=None):
        if why_untimed:
            return self.row(cell, "skipped", why_untimed, memory_bytes=cell.seq_len)
        calls.append((cell.variant, cell.seq_len, cell.mode))
        ms = ms_of_cell(cell)
        values = {"time_ms_median": ms, "time_ms_min": ms, "time_ms_max": ms, "repeats": 1}
        return self.row(cell, "ok", compile_s=0.0, memory_bytes=cell.seq_len, **values)

    return measure


@pytest.fixture
def no_gemm(monkeypatch):
    """No reference GEMM, no plot and no full garbage collection after each cell (in a test
    worker's heap grown by hundreds of tests one takes seconds: 2.1 s over 2.6M objects after
    the conformance and decode suites): these tests are about the runner."""
    monkeypatch.setattr(bench, "gemm_gflops", lambda *a, **k: 100.0)
    monkeypatch.setattr(report, "plot", lambda rows, path: None)
    monkeypatch.setattr(sweep.gc, "collect", lambda *a, **k: 0)


def test_resume_measures_only_missing_cells(tmp_path, monkeypatch, no_gemm):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    run(tiny(lengths="64,128,256"), tmp_path)
    # Lengths ascend; at each length the baselines (xla, blockwise) run first.
    assert calls[:4] == [
        ("xla", 64, "fwd"),
        ("xla", 64, "fwd_bwd"),
        ("blockwise", 64, "fwd"),
        ("blockwise", 64, "fwd_bwd"),
    ]
    assert len(calls) == 12
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines(tmp_path)[:-3]) + "\n")  # lose the last three cells
    calls.clear()
    rows, _ = run(tiny(lengths="64,128,256"), tmp_path)
    assert calls == [
        ("xla", 256, "fwd_bwd"),
        ("blockwise", 256, "fwd"),
        ("blockwise", 256, "fwd_bwd"),
    ]
    assert len(rows) == 12


def common(config):
    """The fields the runner adds to each row (device, versions)."""
    return sweep.Sweep(config, [], Path("/nonexistent")).common


def test_a_crash_during_a_cell_stops_growth_like_an_oom(tmp_path, monkeypatch, no_gemm):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    config = tiny(lengths="64,128", modes="fwd")
    killed = sweep.plan_cells(config, "float32")[0]  # xla at T=64
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process that held the cell's claim and is gone
    claim = Claims(tmp_path / "claims").path(killed.key())
    claim.parent.mkdir()
    record = {**killed.fields(), **common(config), "pid": dead.pid, "host": platform.node()}
    claim.write_text(json.dumps(record))  # died mid-cell
    rows, _ = run(config, tmp_path)
    assert calls == [("blockwise", 64, "fwd"), ("blockwise", 128, "fwd")]  # xla not retried
    xla = [r for r in rows if r["variant"] == "xla"]
    assert [r["status"] for r in xla] == ["crashed", "skipped"]
    assert "died" in xla[0]["error"] and "pid" not in xla[0]
    assert xla[1]["error"] == "stopped growing: crashed at T=64"
    assert not claim.exists()
    calls.clear()
    run(config, tmp_path)  # the crashed cell stays done, and its lane stays stopped
    assert calls == []
    # A crash while retrying an error row is recorded too.
    retry = tmp_path / "retry"
    run(config, retry)
    rewrite(retry, status="error")
    (retry / "inflight.json").write_text(json.dumps({**killed.fields(), **common(config)}))
    rows, out = run(config, retry)
    assert "recorded a crash: xla T=64 fwd" in out
    assert [r["status"] for r in rows if r["variant"] == "xla"] == ["crashed", "skipped"]
    # A torn inflight file (power loss) is dropped.
    (retry / "inflight.json").write_text('{"variant": "x')
    run(config, retry)
    assert not (retry / "inflight.json").exists()
    # A crash of other code (the kernel was changed since) does not condemn the new code.
    other = tmp_path / "other"
    other.mkdir()
    (other / "inflight.json").write_text(json.dumps({**killed.fields(), "git_commit": "0ld"}))
    rows, _ = run(config, other)
    assert ("xla", 64, "fwd") in calls and {r["status"] for r in rows} == {"ok"}


def rewrite(workdir, **changes):
    """Edits every row of a workdir's results.jsonl, as if measured otherwise."""
    rows = [{**json.loads(line), **changes} for line in lines(workdir)]
    (workdir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("field", ["git_commit", "jax_version"])
def test_rows_of_other_code_are_measured_again_unless_reuse_stale(
    tmp_path, monkeypatch, no_gemm, field
):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    config = tiny(lengths="64", modes="fwd")
    run(config, tmp_path)
    assert len(calls) == 2
    rewrite(tmp_path, **{field: "0123abc"})  # measured by another version
    calls.clear()
    _, out = run(config, tmp_path, reuse_stale=True)
    assert calls == [] and "resuming: 2 cells already done" in out
    rows, out = run(config, tmp_path)
    assert len(calls) == 2 and "2 cells have rows in" in out and "measured again" in out
    assert {r[field] for r in rows} == {common(config)[field]}


def test_the_code_version_changes_with_an_edit_of_the_code_only(tmp_path, monkeypatch):
    git = {"log": "abc1234\n", "diff": "", "ls-files": ""}  # a clean checkout
    monkeypatch.setattr(provenance, "_git", lambda command, *args: git[command])
    assert provenance.code_version() == "abc1234"  # docs edits are not in `diff -- CODE`
    git["diff"] = "+x = 1\n"
    first = provenance.code_version()
    assert first.startswith("abc1234-dirty+") and provenance.code_version() == first
    git["diff"] = "+x = 2\n"
    second = provenance.code_version()
    assert second != first
    git["ls-files"] = "attention_variants/new_variant.py\n"  # a new, untracked kernel file
    assert provenance.code_version() not in (first, second)
    git["log"] = None  # not a git checkout: a hash of the sources
    assert provenance.code_version().startswith("source-")


def test_a_commit_of_the_docs_alone_keeps_the_code_version(tmp_path, monkeypatch):
    def git(*args):
        identity = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(["git", *identity, *args], cwd=tmp_path, check=True, capture_output=True)

    def commit(path, text):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", path)
        git("commit", "-m", path)

    git("init")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    commit("experiments/train.py", "x = 1\n")
    code = provenance.code_version()
    commit("docs/quality.md", "a result\n")  # a sweep interrupted across it resumes
    assert provenance.code_version() == code and not code.startswith("source-")
    commit("experiments/train.py", "x = 2\n")
    assert provenance.code_version() != code


def test_error_rows_are_retried(tmp_path, monkeypatch, no_gemm):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    config = tiny(lengths="64", modes="fwd")
    run(config, tmp_path)
    rewrite(tmp_path, status="error", error="RuntimeError: transient")
    calls.clear()
    rows, _ = run(config, tmp_path)
    assert calls == [("xla", 64, "fwd"), ("blockwise", 64, "fwd")]
    assert {r["status"] for r in rows} == {"ok"}


def test_a_workdir_of_another_setting_is_refused(tmp_path, monkeypatch, no_gemm):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    run(tiny(lengths="64", modes="fwd"), tmp_path)
    before = lines(tmp_path)
    for change in ({"head_dim": 32}, {"batch": 2}, {"segments": 2}, {"causal": False}):
        with pytest.raises(cells.MixedRows, match=next(iter(change))):
            run(tiny(lengths="64", modes="fwd", **change), tmp_path)
    rewrite(tmp_path, device="gpu:H100")
    with pytest.raises(cells.MixedRows, match="device"):
        run(tiny(lengths="64", modes="fwd"), tmp_path)
    assert len(lines(tmp_path)) == len(before)  # nothing was measured


def test_run_counts_ok_cells_and_is_zero_when_every_cell_failed(tmp_path, monkeypatch, no_gemm):
    def failing(cell, config):
        raise RuntimeError("injected failure")

    monkeypatch.setitem(kinds.KINDS, "kernel", failing)
    config = tiny(lengths="64")
    assert sweep.run(config, tmp_path, "test", out=io.StringIO()) == 0
    monkeypatch.undo()
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, []))
    monkeypatch.setattr(report, "plot", lambda rows, path: False)
    assert sweep.run(config, tmp_path, "test", out=io.StringIO()) == 4  # errors retried


def test_oom_is_predicted_without_running_and_stops_growth(tmp_path, monkeypatch, no_gemm):
    monkeypatch.setattr(bench, "free_memory_bytes", lambda device: 1024)  # 1 KiB free
    timed = []
    monkeypatch.setattr(bench, "time_calls", lambda *a, **k: timed.append(1))
    rows, out = run(tiny(lengths="64,128", variants="xla", modes="fwd"), tmp_path)
    assert timed == []
    assert [r["status"] for r in rows] == ["oom", "skipped"]
    assert rows[0]["error"].startswith("predicted: needs") and rows[0]["memory_bytes"] > 1024
    assert rows[1]["error"] == "stopped growing: oom at T=64"
    assert "oom" in (tmp_path / "report.md").read_text()


def test_an_exception_is_an_error_row_and_the_sweep_goes_on(tmp_path, monkeypatch, no_gemm):
    build = kinds.KINDS["kernel"]

    def flaky(cell, config):
        if cell.variant == "xla" and cell.mode == "fwd_bwd":
            raise RuntimeError("injected failure")
        return build(cell, config)

    monkeypatch.setitem(kinds.KINDS, "kernel", flaky)
    rows, _ = run(tiny(lengths="64"), tmp_path)
    status = {(r["variant"], r["mode"]): (r["status"], r["error"]) for r in rows}
    assert status[("xla", "fwd_bwd")] == ("error", "RuntimeError: injected failure")
    assert status[("xla", "fwd")][0] == status[("blockwise", "fwd_bwd")][0] == "ok"


def test_slow_variants_stop_growing_and_the_budget_is_kept(tmp_path, monkeypatch, no_gemm):
    calls = []

    def ms(cell):  # xla: 1 s at T=64, 4 s at 128, ...; blockwise: 1 ms
        return 1000.0 * (cell.seq_len / 64) ** 2 if cell.variant == "xla" else 1.0

    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(ms, calls))
    config = tiny(lengths="64,128,256,512", modes="fwd", max_call_s=10.0)
    rows, _ = run(config, tmp_path)
    xla = [r for r in rows if r["variant"] == "xla"]
    assert [r["status"] for r in xla] == ["ok", "ok", "skipped", "skipped"]
    # Slope 2 from T=64 and 128; beyond the cap a cell is compiled for its memory only, and
    # after every timed cell (the last rows of the file).
    assert xla[2]["error"] == "not timed: predicted 16 s per call > max_call_s=10"
    assert xla[3]["error"] == "not timed: predicted 64 s per call > max_call_s=10"
    assert xla[3]["memory_bytes"] == 512
    assert [json.loads(line)["seq_len"] for line in lines(tmp_path)[-2:]] == [256, 512]
    assert len(calls) == 2 + 4  # xla at 64 and 128, blockwise everywhere
    # Cells that would overrun the whole-sweep budget are skipped too.
    rows, _ = run(tiny(lengths="64", variants="xla", time_budget_s=0.5), tmp_path / "budget")
    assert {r["status"] for r in rows} == {"skipped"}
    assert rows[0]["error"].startswith("time budget")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"lengths": "64,abc"}, "lengths"),
        ({"lengths": "0"}, "lengths"),
        ({"variants": "xla,nope"}, "variants"),
        ({"modes": "fwd,bwd"}, "modes"),
        ({"heads": 3, "kv_heads": 2}, "kv_heads"),
        ({"dtype": "int8"}, "dtype"),
        ({"memory_fraction": 1.5}, "memory_fraction"),
        ({"options": {"blockwise": {"block_q": -1}}}, "options.blockwise"),
        ({"options": {"blockwise": {"tile": 8}}}, "options.blockwise"),
        ({"options": {"nope": {}}}, "options.nope"),
        ({"segments": 0}, "segments"),
        ({"segments": 1000}, "segments"),
        ({"seq_devices": "1,x"}, "seq_devices"),
        ({"seq_devices": "1,2"}, "seq_devices"),  # one device in this session (mesh: test_mesh)
    ],
)
def test_bad_config_values_name_the_field(changes, field):
    config = tiny()
    config.update(changes)
    with pytest.raises(ConfigError) as e:
        plan.plan_cells(config, plan.resolve_dtype(config.dtype, "cpu"))
    assert e.value.field == field
    assert str(e.value).startswith(f"config.{field}:")


def test_head_dim_zero_is_64_on_cpu_and_128_on_accelerators():
    assert [plan.resolve_head_dim(0, p) for p in ("cpu", "gpu", "tpu")] == [64, 128, 128]
    assert plan.resolve_head_dim(32, "gpu") == 32


def test_all_variants_leave_the_ring_to_mesh_sweeps():
    config = tiny(variants="all")
    planned = {c.variant for c in plan.plan_cells(config, "float32")}
    assert "ring" not in planned and set(av.names()) - planned == {"ring"}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.lengths=64,x", "config.lengths"),  # caught by validation
        ("--config.heads=two", "config.heads"),  # caught by flag parsing
        ("--config.nosuch=1", "nosuch"),  # no such field
        ("--config=configs/nope.py", "nope.py"),  # no such file
    ],
)
def test_cli_exits_2_on_a_bad_config(tmp_path, override, needle):
    cmd = [sys.executable, "-m", "experiments.sweep", "--config=configs/tiny_sweep.py", override]
    cmd.append(f"--workdir={tmp_path}")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "invalid config" in result.stderr
    assert not (tmp_path / "results.jsonl").exists()


def sweep_cli(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "experiments.sweep", "--config=configs/tiny_sweep.py"]
    cmd += ["--config.lengths=64", "--config.modes=fwd", "--config.gemm_size=64"]
    cmd += [*overrides, f"--workdir={tmp_path}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_overrides_options_of_variants_the_config_does_not_list(tmp_path):
    assert "fixed" not in tiny().variants and "sliding_window" not in tiny().variants
    overrides = [
        "--config.variants=fixed,sliding_window",
        "--config.options.fixed.block=32",
        "--config.options.fixed.block_q=16",  # a None default
        "--config.options.sliding_window.window=(8, 0)",  # an int default, given a pair
    ]
    result = sweep_cli(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr
    rows = {r["variant"]: r for r in report.load_rows(tmp_path)}
    assert {r["status"] for r in rows.values()} == {"ok"}
    fixed = rows["fixed"]["options"]
    assert (fixed["block"], fixed["summary"], fixed["block_q"]) == (32, 16, 16)
    assert rows["sliding_window"]["options"]["window"] == [8, 0]  # a tuple, through JSON


def test_cli_exits_1_when_every_cell_failed(tmp_path):
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN may run here")
    # cuDNN does not run on a CPU: every cell is an error row.
    result = sweep_cli(
        tmp_path, "--config.variants=xla", "--config.options.xla.implementation=cudnn"
    )
    assert result.returncode == 1, result.stderr
    assert "no cell of this sweep ran successfully" in result.stderr
    assert {r["status"] for r in report.load_rows(tmp_path)} == {"error"}


def test_packed_rows_give_each_document_its_own_attention_and_flops():
    config = tiny(segments=4, variants="blockwise", lengths="64")
    cell = plan.plan_cells(config, "float32")[0]
    built = kinds.kernel.build_kernel(cell, config)
    q, k, v, ids = built.args
    assert ids.shape == (1, 64) and [int(n) for n in jnp.bincount(ids[0])] == [16] * 4
    packed = built.fn(*built.args)
    # The third document alone, as its own sequence, gives the same output.
    alone = av.get("blockwise", **cell.options)(q[:, 32:48], k[:, 32:48], v[:, 32:48], causal=True)
    np.testing.assert_allclose(packed[:, 32:48], alone, rtol=1e-5, atol=1e-5)
    spec = av.spec("blockwise")
    per_document = spec.flops(1, 16, 16, 2, 16, causal=True, **cell.options)
    assert built.useful_flops == pytest.approx(4 * per_document)
    with pytest.raises(ConfigError, match="segments"):
        plan.plan_cells(tiny(segments=128, lengths="64"), "float32")


def test_train_step_cells_time_the_model(tmp_path, no_gemm):
    from configs import model_sweep

    config = model_sweep.get_config()
    config.update(dict(variants="blockwise", lengths="32", heads=2, kv_heads=1, head_dim=8))
    config.update(dict(cell_budget_s=0.05, min_repeats=2, max_repeats=2, segments=2))
    config.model.update(dict(num_layers=1, mlp_dim=32, vocab_size=64))
    rows, _ = run(config, tmp_path)
    (row,) = rows
    assert row["status"] == "ok", row["error"]
    assert row["mode"] == "train_step" and row["model"]["num_layers"] == 1
    assert set(row) == ROW_FIELDS | {"model"}
    assert row["repeats"] == 2 and row["memory_bytes"] > 0
    # 6 x matmul weights x tokens (tied 64x16 embedding, q/k/v/out, gated MLP) + attention.
    weights = 64 * 16 + (16 * 16 + 2 * 16 * 8 + 16 * 16) + 3 * 16 * 32
    attention = 2 * 3.5 * 4 * 2 * 8 * 16 * 16 / 2  # two packed documents of 16 tokens
    assert row["useful_flops"] == pytest.approx(6 * weights * 32 + attention)


def test_a_hybrid_is_a_variant_of_the_model_sweeps(tmp_path, no_gemm):
    """ "sliding_window+blockwise": one block of each, each its own options, FLOPs and
    implementation; its decode cell runs both caches."""
    from configs import decode_sweep, model_sweep

    config = model_sweep.get_config()
    config.update(dict(variants="sliding_window+blockwise", lengths="32", heads=2, kv_heads=1))
    config.update(dict(head_dim=8, cell_budget_s=0.05, min_repeats=2, max_repeats=2))
    config.options.sliding_window.update(dict(window=4, block_q=8, block_k=8))
    config.model.update(dict(num_layers=2, mlp_dim=32, vocab_size=64))
    (row,), _ = run(config, tmp_path / "train")
    assert row["status"] == "ok", row["error"]
    assert row["implementation"] == "sliding_window=jax+blockwise=jax"
    assert row["options"]["sliding_window"]["window"] == 4
    weights = 64 * 16 + 2 * ((16 * 16 + 2 * 16 * 8 + 16 * 16) + 3 * 16 * 32)
    attention = sum(av.spec(n).flops(1, 32, 32, 2, 8, **row["options"][n])
                    for n in ("sliding_window", "blockwise"))  # fmt: skip
    assert row["useful_flops"] == pytest.approx(6 * weights * 32 + 3.5 * attention)
    config = decode_sweep.get_config()
    config.update(dict(variants="sliding_window*2+dense", lengths="16", heads=2, kv_heads=1))
    config.update(dict(head_dim=8, cell_budget_s=0.05, min_repeats=2, max_repeats=2))
    config.options.sliding_window.update(dict(window=4, block_q=8, block_k=8))
    config.model.update(dict(num_layers=3, mlp_dim=32, vocab_size=64))
    rows, _ = run(config, tmp_path / "decode")
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for bad, needle in (("dense+nope", "unknown variant 'nope'"), ("dense*0", "positive int")):
        with pytest.raises(ConfigError, match=needle):
            plan.plan_cells(edited(config, variants=bad), "float32")
    with pytest.raises(ConfigError, match="a hybrid .* is a model"):
        plan.plan_cells(tiny(variants="dense+blockwise"), "float32")


def edited(config, **changes):
    """A copy of `config` with `changes`."""
    config = config.copy_and_resolve_references()
    config.update(changes)
    return config


def test_decode_cells_time_tokens_through_each_cache(tmp_path, no_gemm):
    from configs import decode_sweep

    config = decode_sweep.get_config()
    config.update(dict(variants="dense,sliding_window,linear", lengths="16,64", heads=2))
    config.update(dict(kv_heads=1, head_dim=8, cell_budget_s=0.05, min_repeats=2, max_repeats=2))
    config.options.sliding_window.update(dict(window=8, block_q=8, block_k=8))
    config.model.update(dict(num_layers=1, mlp_dim=32, vocab_size=64))
    rows, _ = run(config, tmp_path)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows), rows
    cache = {(r["variant"], r["seq_len"], r["mode"]): r["cache_bytes"] for r in rows}
    steps = cells.DECODE_STEPS
    # Keys and values (float32, K=1 head of 8) for T + steps positions, plus the position.
    assert cache["dense", 64, "decode"] == 2 * (64 + steps) * 8 * 4 + 4
    assert cache["dense", 64, "prefill"] == 2 * 64 * 8 * 4 + 4  # prefill: T positions
    assert cache["sliding_window", 16, "decode"] == cache["sliding_window", 64, "decode"]
    assert cache["linear", 16, "decode"] == 1 * 8 * 9 * 4 + 4  # [B, K, F=H, H+1] float32 sums
    decode = [r for r in rows if r["mode"] == "decode"]
    assert {r["decode_steps"] for r in decode} == {steps} and all(r["tokens_per_s"] for r in decode)
    text = (tmp_path / "report.md").read_text()
    assert "Time per generated token after T cached tokens (ms)" in text
    assert "| sliding_window | " in text.split("## Decoding")[1]


def test_decode_cells_need_one_document_per_row():
    from configs import decode_sweep

    config = decode_sweep.get_config()
    config.segments = 2
    with pytest.raises(ConfigError, match="one sequence per row"):
        plan.plan_cells(config, "float32")


@pytest.mark.parametrize(
    "name",
    [
        "context_sweep",
        "context_sweep_long",
        "model_sweep",
        "decode_sweep",
        "lra_speed",
        "tiny_sweep",
    ],
)
def test_shipped_configs_are_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    planned = plan.plan_cells(config, "float32")
    variants = {c.variant for c in planned}
    assert planned and len(planned) == len({c.key() for c in planned})
    meshed = {n for n in av.names() if cells.mesh_aware(n)}  # ring: mesh sweeps only
    if name == "context_sweep":
        assert variants == set(av.names()) - meshed
        assert sorted({c.seq_len for c in planned}) == [512 * 2**i for i in range(6)]
    if name == "context_sweep_long":
        assert variants == {n for n in av.names() if av.spec(n).long_context} - meshed
        assert max(c.seq_len for c in planned) == 131072
    if name == "lra_speed":
        assert sorted({c.seq_len for c in planned}) == [1024, 2048, 3072, 4096]
        assert planned[0].variant == "xla" and planned[0].batch == 32


@pytest.mark.parametrize(
    "model_changes",
    [{"positions": "alibi"}, {"dropout_rate": 2.0}, {"dtype": "bfloat16"}, {"attention": "xla"}],
)
def test_bad_model_section_names_the_field(model_changes):
    from configs import model_sweep

    config = model_sweep.get_config()
    config.model.update(model_changes)
    with pytest.raises(ConfigError) as e:
        plan.plan_cells(config, "float32")
    assert e.value.field == "model"


def test_a_cell_claimed_by_a_live_process_is_left_to_it(tmp_path, monkeypatch, no_gemm):
    calls = []
    monkeypatch.setattr(sweep.Sweep, "measure", fake_measure(lambda cell: 1.0, calls))
    config = tiny(lengths="64", modes="fwd")
    taken = sweep.plan_cells(config, "float32")[0]  # xla at T=64
    claims = Claims(tmp_path / "claims")
    claims.take(taken.key(), {**taken.fields(), **common(config)})
    record = json.loads(claims.held.read_text())
    claims.held.write_text(json.dumps({**record, "pid": os.getppid()}))  # pytest's parent
    rows, _ = run(config, tmp_path)
    assert calls == [("blockwise", 64, "fwd")] and [r["variant"] for r in rows] == ["blockwise"]
    assert claims.held.exists()  # still that process's


def test_two_processes_share_one_sweep(tmp_path):
    """The same command twice at once, into one folder: every cell is measured once."""
    cmd = [sys.executable, "-m", "experiments.sweep", "--config=configs/tiny_sweep.py",
           "--config.lengths=32", "--config.gemm_size=64", f"--workdir={tmp_path}"]  # fmt: skip
    both = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    for p in both:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    keys = [cells.row_key(json.loads(line)) for line in lines(tmp_path)]
    assert len(keys) == len(set(keys)) == 2 * 2  # variants x modes, each once
    assert not list((tmp_path / "claims").glob("*"))
