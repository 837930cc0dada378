"""Report: exponent fits, crossovers, tables, files, and the --compare regression guard."""

import json
import sys

import pytest

from experiments import report


def make_row(variant, T, mode="fwd", ms=1.0, memory=None, status="ok", **extra):
    row = {
        "variant": variant,
        "options": {},
        "seq_len": T,
        "batch": 1,
        "heads": 8,
        "kv_heads": 8,
        "head_dim": 64,
        "dtype": "float32",
        "mode": mode,
        "status": status,
        "error": None if status == "ok" else "why",
        "time_ms_median": ms if status == "ok" else None,
        "memory_bytes": memory if status == "ok" else None,
        "gflops": 1.0,
    }
    return {**row, **extra}


LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]


def synthetic_rows():
    """quadratic: 1e-5 T^2 ms, O(T^2) memory, oom at 16384; linear: 0.02 T + 5 ms, O(T)."""
    rows = []
    for T in LENGTHS:
        if T < 16384:
            rows.append(make_row("quadratic", T, ms=1e-5 * T**2, memory=4 * T**2))
        else:
            rows.append(make_row("quadratic", T, status="oom"))
        rows.append(make_row("linear", T, ms=0.02 * T + 5.0, memory=1000 * T))
    return rows


def test_fit_exponent_recovers_powers_over_the_longest_lengths():
    fit = report.fit_exponent([(T, 3.0 * T**2) for T in LENGTHS])
    assert fit.slope == pytest.approx(2.0)
    assert (fit.lo, fit.hi, fit.n) == (2048, 16384, 4)  # the top four doublings
    # A fixed overhead bends the short end; the fit over the long end is still ~1.
    fit = report.fit_exponent([(T, 0.02 * T + 5.0) for T in LENGTHS])
    assert 0.9 < fit.slope < 1.0
    assert report.fit_exponent([(512, 1.0)]) is None
    assert report.fit_exponent([]) is None


def test_crossover_and_longest_fit():
    rows = synthetic_rows()
    # linear (0.02T+5) beats quadratic (1e-5 T^2) from T=4096 on (2048: 46 vs 42 ms).
    assert report.crossover(rows, "linear", "quadratic", "fwd").startswith(">= 4096")
    assert "did not run at 16384" in report.crossover(rows, "linear", "quadratic", "fwd")
    assert report.crossover(rows, "quadratic", "linear", "fwd") == "slower at 8192"
    assert report.longest_fit(rows, "quadratic", "fwd") == "8192 (then oom at 16384)"
    assert report.longest_fit(rows, "linear", "fwd") == "16384"


def test_table_marks_failed_cells():
    text = report.table(synthetic_rows(), "fwd", "time_ms_median")
    lines = text.splitlines()
    assert lines[0] == "| variant | 512 | 1024 | 2048 | 4096 | 8192 | 16384 |"
    assert lines[2].startswith("| quadratic | 2.62 |") and lines[2].endswith("| oom |")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_write_report_builds_markdown_csv_and_plot(tmp_path):
    write_jsonl(tmp_path / "results.jsonl", synthetic_rows())
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert "Median time (ms)" in text and "Compiled memory (MiB)" in text
    assert "Setting of every row: batch=1, heads=8, kv_heads=8, head_dim=64, dtype=float32" in text
    assert "| quadratic | fwd | 2.00 (1024-8192, 4 pts) | 2.00 (1024-8192, 4 pts) |" in text
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(LENGTHS) * 2
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_rates_in_tflops_on_fast_devices_and_as_a_fraction_of_the_gemm(tmp_path):
    fast = [{**r, "gflops": 2e6 / T, "gemm_fraction": 0.5} for r in synthetic_rows()
            for T in [r["seq_len"]]]  # fmt: skip
    write_jsonl(tmp_path / "results.jsonl", fast)
    text = report.write_report(tmp_path).read_text()
    assert (
        "Useful TFLOP/s:" in text and "| linear | 3.91 | 1.95 |" in text
    )  # 2000 / 512, 2000 / 1024
    assert "Fraction of the same-run GEMM rate:" in text and "| linear | 0.50 |" in text
    write_jsonl(tmp_path / "results.jsonl", synthetic_rows())  # 1 GFLOP/s: kept in GFLOP/s
    assert "Useful GFLOP/s:" in report.write_report(tmp_path).read_text()


def two_modes():
    fwd = [r for r in synthetic_rows() if r["status"] == "ok"]
    bwd = [{**r, "mode": "fwd_bwd", "time_ms_median": 3 * r["time_ms_median"]} for r in fwd]
    return fwd + bwd


def test_plot_has_a_colour_per_variant_and_a_line_style_per_mode():
    pytest.importorskip("matplotlib")
    from matplotlib.legend import Legend

    fig = report.figure(two_modes())
    children = fig.axes[0].get_children()
    legends = {a.get_title().get_text(): a for a in children if isinstance(a, Legend)}
    assert set(legends) == {"variant", "mode"}
    variants, modes = legends["variant"], legends["mode"]
    assert [t.get_text() for t in variants.get_texts()] == ["quadratic", "linear"]
    colours = [h.get_color() for h in variants.legend_handles]
    assert [t.get_text() for t in modes.get_texts()] == ["fwd", "fwd_bwd"]
    styles = [h.get_linestyle() for h in modes.legend_handles]
    assert len(set(colours)) == 2 and len(set(styles)) == 2
    # Every plotted series is drawn in its variant's colour and its mode's style.
    series = [line for line in fig.axes[0].get_lines() if line.get_marker() == "o"]
    drawn = {(line.get_color(), line.get_linestyle()) for line in series}
    assert drawn == {(c, s) for c in colours for s in styles}


def test_the_report_needs_no_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    write_jsonl(tmp_path / "results.jsonl", synthetic_rows())
    text = report.write_report(tmp_path).read_text()
    assert "(no plot: matplotlib is not installed)" in text and "| linear |" in text
    assert not (tmp_path / "scaling.png").exists()


def test_the_report_refuses_rows_of_different_settings(tmp_path, capsys):
    rows = synthetic_rows()
    rows += [make_row("linear", 512, head_dim=128), make_row("linear", 1024, dtype="bfloat16")]
    write_jsonl(tmp_path / "results.jsonl", rows)
    with pytest.raises(report.MixedRows, match=r"head_dim 64 \(\d+\), 128 \(1\)"):
        report.write_report(tmp_path)
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "head_dim" in err and "dtype" in err and "batch" not in err
    assert not (tmp_path / "report.md").exists()


def test_the_report_labels_rows_of_different_code(tmp_path):
    rows = [make_row("a", T, git_commit="abc", jax_version="1") for T in (512, 1024)]
    rows.append(make_row("a", 2048, git_commit="def", jax_version="1"))
    write_jsonl(tmp_path / "results.jsonl", rows)
    text = report.write_report(tmp_path).read_text()
    versions = "abc with jax 1 (2 rows), def with jax 1 (1 rows)"
    assert f"rows measured by different code**: {versions}; cells marked †" in text
    assert "| a | 1.00† | 1.00† | 1.00 |" in text  # the latest row's code is unmarked


def test_load_rows_last_row_wins_and_torn_line_is_ignored(tmp_path):
    rows = [make_row("a", 512, ms=1.0), make_row("a", 512, ms=2.0)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"variant": "a", "seq_')  # a crash mid-write
    rows = report.load_rows(path)
    assert len(rows) == 1 and rows[0]["time_ms_median"] == 2.0


def test_a_skipped_row_never_hides_a_measured_one(tmp_path):
    """A later sweep's budget that skips a cell of older code leaves its measurement shown;
    an error row is the newest news and wins, a measurement wins over an earlier skip."""
    skip = make_row("a", 512, status="skipped", git_commit="new")
    cases = [
        ([make_row("a", 512, ms=3.0, git_commit="old"), skip], "ok"),
        ([make_row("a", 512, status="oom"), skip], "oom"),
        ([skip, make_row("a", 512, ms=3.0)], "ok"),
        ([make_row("a", 512, ms=3.0), make_row("a", 512, status="error")], "error"),
    ]
    for written, status in cases:
        (row,) = report.load_rows(write_jsonl(tmp_path / "r.jsonl", written))
        assert row["status"] == status, written


@pytest.mark.parametrize(
    "factor, new_status, threshold, code",
    [
        (1.05, "ok", 0.1, 0),  # 5% slower: within the default threshold
        (1.25, "ok", 0.1, 1),  # 25% slower: a regression
        (1.25, "ok", 0.3, 0),  # ... unless the threshold allows it
        (0.5, "ok", 0.1, 0),  # faster
        (1.0, "oom", 0.1, 1),  # ran before, does not now
    ],
)
def test_compare_exit_codes(tmp_path, capsys, factor, new_status, threshold, code):
    old = [make_row("a", 512, ms=10.0), make_row("b", 512, ms=10.0)]
    new = [make_row("a", 512, ms=10.0 * factor, status=new_status), make_row("b", 512, ms=10.0)]
    args = ["--compare", str(write_jsonl(tmp_path / "old.jsonl", old))]
    args += [str(write_jsonl(tmp_path / "new.jsonl", new)), "--threshold", str(threshold)]
    assert report.main(args) == code
    out = capsys.readouterr().out
    assert ("FAIL" in out) == bool(code)
    if new_status == "ok":
        assert f"{factor:.2f}" in out


def compare_files(tmp_path, old, new):
    args = ["--compare", str(write_jsonl(tmp_path / "old.jsonl", old))]
    return report.main([*args, str(write_jsonl(tmp_path / "new.jsonl", new))])


def test_compare_fails_when_a_cell_that_ran_is_missing_or_nothing_matches(tmp_path):
    old = [make_row("a", 512, ms=10.0), make_row("b", 512, ms=10.0)]
    assert compare_files(tmp_path, old, old[:1]) == 1  # b ran before and is gone now
    assert compare_files(tmp_path, old, [make_row("c", 512)]) == 1  # nothing compared


def test_compare_matches_a_cell_whose_options_changed(tmp_path, capsys):
    old = [make_row("a", 512, ms=10.0, options={"block_q": 512})]
    new = [make_row("a", 512, ms=20.0, options={"block_q": 256})]
    assert compare_files(tmp_path, old, new) == 1  # the retuned kernel is compared, and slower
    assert "2.00" in capsys.readouterr().out


def test_compare_pairs_rows_written_before_a_key_field_existed(tmp_path, capsys):
    old = [make_row("a", 512, ms=10.0)]  # no `segments` field: written by an older sweep
    new = [make_row("a", 512, ms=10.5, segments=1)]
    assert compare_files(tmp_path, old, new) == 0
    assert "1.05" in capsys.readouterr().out


def test_compare_refuses_files_of_different_settings(tmp_path, capsys):
    old = [make_row("a", 512, ms=10.0, device="cpu:cpu")]
    new = [make_row("a", 512, ms=1.0, device="gpu:H100")]
    with pytest.raises(SystemExit) as e:
        compare_files(tmp_path, old, new)
    assert e.value.code == 2 and "device" in capsys.readouterr().err


def test_compare_rejects_an_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        report.main(["--compare", str(empty), str(empty)])
    assert e.value.code == 2


def test_training_runs_are_grouped_by_setting_with_the_best_rate_over_seeds():
    """runs.md's protocol table: runs equal but for seed and rate form a setting (the options
    of variants a run does not use do not split it); the rate with the lowest mean bits is
    bold, flagged at the grid's edge; another bias is its own setting, named by it."""
    from experiments.runs_report import protocol_table, setting

    def run(rate, seed, final, bias=None, at_512=None, window=64):
        options = {"dense": {"bias": bias}, "sliding_window": {"window": window}}
        config = {"dataset": "bytes", "seed": seed, "learning_rate": rate, "options": options}
        config["model"] = {"attention": "dense", "attention_options": [["bias", bias]]}
        by_length = {"512": at_512} if at_512 else {}
        return {"dataset": "bytes", "attention": "dense", "score": "eval/bits_per_token",
                "learning_rate": rate, "seed": seed, "final": final, "finished": True,
                "setting": setting(config), "by_length": by_length}  # fmt: skip

    rows = [run(1e-3, 0, 2.4), run(1e-3, 1, 2.6, window=32), run(2e-3, 0, 2.1, at_512=2.5)]
    rows += [run(2e-3, 1, 2.3, at_512=2.7), run(4e-3, 0, 2.3), run(2e-3, 0, 2.0, bias="alibi")]
    rows += [{**run(4e-3, 1, 1.0), "finished": False}]  # still training: left out
    text = "\n".join(protocol_table(rows, ["512"]))
    plain = "| bytes | dense (options.dense.bias=null) | eval/bits_per_token |"
    assert f"{plain} 0.001 | 2 | 2.5000 [2.4000-2.6000] |" in text
    assert "| **0.002** | 2 | 2.2000 [2.1000-2.3000] | 0.1414 | 2.6000 (2) |" in text  # interior
    assert "| 0.004 | 1 | 2.3000 | - |" in text
    assert '(options.dense.bias="alibi") | eval/bits_per_token | **0.002**◂ | 1 |' in text


def test_evaluations_in_other_windows_are_other_columns():
    """Each experiments.evaluate call scores the same tokens at all its lengths (windows of its
    longest length per file); a score read in other windows is another column, not the same."""
    from experiments.runs_report import _at, _place

    calls = [{"length": n, "per_document": 1024} for n in (256, 512, 1024)]
    calls += [{"length": n, "per_document": 2048} for n in (256, 2048)]
    calls += [{"length": 256, "data": {"depth": 0.5}}]  # a task's rows: no windows
    places = [_at(row) for row in calls]
    assert places == ["256/1024", "512/1024", "1024", "256/2048", "2048", "256@0.5"]
    assert sorted(places, key=_place)[:3] == ["256@0.5", "256/1024", "512/1024"]
