"""The sweep's train_eval kind (quality beside cost) end to end on a tiny MQAR grid."""

import io

from configs import ablation_mqar
from experiments import cells, report, sweep


def tiny(data_dir, **changes):
    config = ablation_mqar.get_config()
    config.update(dict(variants="dense,linear", lengths="32", num_pairs="2,16", batch=8))
    config.update(dict(cell_budget_s=0.05, min_repeats=1, max_repeats=1, gemm_size=64))
    config.data.update(dict(num_train=64, num_test=16))
    config.train.update(dict(num_steps=4, warmup_steps=1, data_dir=data_dir))
    config.update(changes)
    return config


def test_the_planner_leaves_out_pairs_that_do_not_fit(tmp_path):
    planned = cells.plan_cells(tiny(str(tmp_path)), "float32")
    assert {(c.variant, c.seq_len, c.task["num_pairs"]) for c in planned} == {
        (v, 32, 2)
        for v in ("dense", "linear")  # N = 16: 4 x 16 > 32, left out
    }
    assert planned[0].variant == "dense"  # the baseline first


def test_train_eval_cells_report_quality_beside_cost(tmp_path):
    out = io.StringIO()
    assert sweep.run(tiny(str(tmp_path / "tfds")), tmp_path / "run", "test", out=out) == 2
    rows = report.load_rows(tmp_path / "run")
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["params"] > 0 and row["train_s"] > 0 and row["time_ms_median"] > 0
    assert len({r["params"] for r in rows}) == 1  # same parameter count across variants
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Quality" in text and "| dense num_pairs=2 |" in text
    assert "| dense | 32 | num_pairs=2 |" in text  # quality beside cost
    assert (tmp_path / "run" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in out.getvalue()
