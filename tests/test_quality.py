"""The sweep's train_eval kind (quality beside cost) end to end on a tiny MQAR grid: seeds and
learning rates as axes, the real training loop per cell, and the report's best-rate protocol."""

import io
import json

import pytest

from configs import ablation_listops, ablation_mqar, ablation_passkey, ablation_pathfinder
from experiments import cells, plan, quality_report, report, sweep
from experiments.configlib import ConfigError
from tests.test_report import make_row


@pytest.fixture(autouse=True)
def no_full_collection(monkeypatch):
    """The runner's gc.collect after each cell frees a large cell's memory; in a test worker's
    heap, grown by hundreds of tests, one takes seconds, and these cells are small."""
    monkeypatch.setattr(sweep.gc, "collect", lambda *a, **k: 0)


def shrink(config, data_dir):
    """`config` at rows of 32 tokens, 64 training rows, 4 steps, one timed repeat."""
    config.update(dict(lengths="32", batch=8, cell_budget_s=0.05, min_repeats=1, max_repeats=1,
                       gemm_size=64))  # fmt: skip
    config.data.update(dict(num_train=64, num_test=16))
    config.train.update(dict(num_steps=4, warmup_steps=1, data_dir=data_dir, eval_every=2))
    return config


def tiny(data_dir, **changes):
    config = shrink(ablation_mqar.get_config(), data_dir)
    config.update(dict(variants="dense,linear", num_pairs="2,16"))
    config.update(changes)
    return config


def test_the_planner_leaves_out_pairs_that_do_not_fit(tmp_path):
    planned = plan.plan_cells(tiny(str(tmp_path), learning_rates="1e-3,3e-3"), "float32")
    assert {(c.variant, c.seq_len, c.task["num_pairs"], c.learning_rate) for c in planned} == {
        (v, 32, 2, lr)
        for v in ("dense", "linear")  # N = 16: 4 x 16 > 32, left out
        for lr in (1e-3, 3e-3)
    }
    assert planned[0].variant == "dense"  # the baseline first
    zoology = tiny(str(tmp_path), variants="dense", lengths="64,128,256", num_pairs="L/16,8")
    planned = plan.plan_cells(zoology, "float32")
    assert [(c.seq_len, c.task["num_pairs"]) for c in planned] == [
        (64, 4), (64, 8), (128, 8), (256, 16), (256, 8)
    ]  # fmt: skip
    labels = {(c.seq_len, report._task(c.fields())) for c in planned}  # as written in the config
    assert (128, " num_pairs=L/16") in labels and (128, " num_pairs=8") not in labels
    plain = tiny(str(tmp_path))  # the default layer: the setting of rows made before the field
    assert "variant_layer" not in plan.plan_cells(plain, "float32")[0].model
    plain.model.variant_layer = False  # every variant with the plain projections
    assert plan.plan_cells(plain, "float32")[0].model["variant_layer"] is False
    budget = tiny(str(tmp_path))  # no budget: the cells' setting is that of rows made before it
    assert "match_params" not in plan.plan_cells(budget, "float32")[0].training["train"]
    budget.train.match_params = 60_000
    assert plan.plan_cells(budget, "float32")[0].training["train"]["match_params"] == 60_000
    budget.train.match_field = "num_heads"  # one error before any cell, not an error per cell
    with pytest.raises(ConfigError, match="train.match_field: must be one of"):
        plan.plan_cells(budget, "float32")


def test_train_eval_cells_report_quality_beside_cost(tmp_path):
    out = io.StringIO()
    assert sweep.run(tiny(str(tmp_path / "tfds")), tmp_path / "run", "test", out=out) == 2
    rows = report.load_rows(tmp_path / "run")
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0
        assert row["params"] > 0 and row["train_s"] > 0 and row["time_ms_median"] > 0
        assert [s for s, _ in row["eval_curve"]] == [2, 4] and row["trained_steps"] == 4
        assert row["converged"] and row["steps_to_threshold"] is None  # no threshold: the cap
        assert (row["seed"], row["learning_rate"]) == (0, 3e-3)
    assert len({r["params"] for r in rows}) == 1  # same parameter count across variants
    runs = sorted(p.name for p in (tmp_path / "run" / "runs").iterdir())  # the real trainer's
    assert [name.split("_")[0] for name in runs] == ["dense", "linear"]
    assert (tmp_path / "run" / "runs" / runs[0] / "summary.json").exists()
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Quality" in text and "| dense num_pairs=2 |" in text
    assert "| dense | 32 | num_pairs=2 | 0.003 (0.003)◂ | 1 |" in text  # quality beside cost
    assert (tmp_path / "run" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in out.getvalue()


def one_tiny_cell(config, variant, tmp_path, **changes):
    """The row of one cell of `config` (shrunk, then `changes` made) for `variant`."""
    shrink(config, str(tmp_path / "tfds")).update(dict(variants=variant, **changes))
    assert sweep.run(config, tmp_path / "run", "test", out=io.StringIO()) == 1
    (row,) = report.load_rows(tmp_path / "run")
    assert row["status"] == "ok", row["error"]
    return row


def test_a_classification_task_trains_encoder_cells_scored_over_rows(tmp_path):
    """ListOps' classification rows (LRA's protocol): the planner sizes the expressions per
    length, each cell trains a bidirectional encoder classifier, accuracy counts the rows."""
    config = ablation_listops.get_config()
    row = one_tiny_cell(config, "sliding_window", tmp_path)
    assert row["task"] == {"min_len": 4, "max_len": 32} and row["model"]["causal"] is False
    assert row["accuracy"] in {k / 16 for k in range(17)}  # 16 test rows, one label each
    assert row["causal"] is False  # the row records the direction its attention ran
    config.causal = True  # the sweep's direction must be the model's
    with pytest.raises(ConfigError, match="causal"):
        plan.plan_cells(config, "float32")


def test_passkey_cells_train_the_passkey_model_and_score_the_digits(tmp_path):
    """configs/ablation_passkey.py: no task axis, configs/passkey.py's model and training, a
    hybrid layer pattern as a variant, accuracy over the key's digits of the test rows."""
    config = ablation_passkey.get_config()
    planned = plan.plan_cells(config, "float32")
    assert [(c.variant, c.seq_len) for c in planned] == [
        (v, 256) for v in ("dense", "sliding_window", "moba", "linear")
    ]
    assert all(c.task == {} for c in planned)  # no task axis
    assert planned[0].training["train"]["num_steps"] == 2000 and planned[0].batch == 32
    config.options.sliding_window.update(dict(window=8, block_q=8, block_k=8))
    row = one_tiny_cell(config, "sliding_window+dense", tmp_path)
    assert row["variant"] == "sliding_window+dense" and row["params"] == 34_816  # passkey.py's
    assert row["accuracy"] in {k / 80 for k in range(81)}  # 16 test rows x 5 digits


def test_pathfinder_cells_classify_images_of_the_cells_length(tmp_path):
    """configs/ablation_pathfinder.py: LRA's image task as a classification cell; a row is the
    flattened image, so the cell's length must be the image's size squared."""
    config = ablation_pathfinder.get_config()
    planned = plan.plan_cells(config, "float32")
    assert {(c.seq_len, c.model["causal"]) for c in planned} == {(256, False)}  # 16 x 16
    shrink(config, str(tmp_path / "tfds"))
    with pytest.raises(ConfigError, match=r"lengths: .* at L=32 \(seq_len=32 must be size \*\* 2"):
        plan.plan_cells(config, "float32")  # shrink's rows of 32 pixels are no 16 x 16 image
    row = one_tiny_cell(config, "sliding_window", tmp_path, lengths="256")
    assert row["accuracy"] in {k / 16 for k in range(17)}  # 16 test images, one label each


def test_another_seed_is_a_new_cell_and_the_measured_ones_are_kept(tmp_path):
    config = tiny(str(tmp_path / "tfds"), variants="dense", num_pairs="2", extrapolate="2")
    assert sweep.run(config, tmp_path / "run", "test", out=io.StringIO()) == 1
    (row,) = report.load_rows(tmp_path / "run")
    assert set(row["extrapolation"]) == {"64"} and 0 <= row["extrapolation"]["64"] <= 1
    assert "at T=64" in (tmp_path / "run" / "report.md").read_text()
    path = tmp_path / "run" / "results.jsonl"
    (written,) = (json.loads(line) for line in path.read_text().splitlines())
    for name in cells.ADDED_MODEL_FIELDS:  # as rows were written before these fields existed
        del written["training"]["train"]["model"][name]
    path.write_text(json.dumps(written) + "\n")
    out = io.StringIO()
    config.seeds = "0,1"
    assert sweep.run(config, tmp_path / "run", "test", out=out) == 2
    assert "resuming: 1 cells already done" in out.getvalue()
    rows = report.load_rows(tmp_path / "run")
    assert sorted(r["seed"] for r in rows) == [0, 1] and len(rows) == 2
    assert rows[0]["loss"] != rows[1]["loss"]  # another seed trains another model


def quality_rows():
    """dense: three seeds at two rates (3e-3 best, inside a 3-rate grid); linear: best at the
    grid's largest rate, one seed unconverged."""
    rows = []
    accuracy = {("dense", 1e-3): [0.5, 0.6, 0.7], ("dense", 3e-3): [0.98, 1.0, 0.99],
                ("dense", 1e-2): [0.2, 0.3, 0.1], ("linear", 1e-3): [0.1, 0.1, 0.1],
                ("linear", 3e-3): [0.2, 0.2, 0.2], ("linear", 1e-2): [0.3, 0.4, 0.5]}  # fmt: skip
    for (variant, lr), values in accuracy.items():
        for seed, value in enumerate(values):
            rows.append(make_row(variant, 64, mode="train_eval", memory=2**20, accuracy=value,
                                 loss=1.0, seed=seed, learning_rate=lr, task={"num_pairs": 4},
                                 converged=not (variant == "linear" and seed == 2),
                                 steps_to_threshold=100, train_s=1.0, params=10))  # fmt: skip
    return rows


def test_the_report_keeps_the_best_rate_per_cell_with_its_spread_and_flags_the_edge(tmp_path):
    best = {b.variant: b for b in quality_report.best_rates(quality_rows(), report._label)}
    dense, linear = best["dense"], best["linear"]
    assert dense.learning_rate == 3e-3 and not dense.edge and dense.converged == 3
    assert abs(dense.mean - 0.99) < 1e-9 and abs(dense.std - 0.01) < 1e-9
    assert linear.learning_rate == 1e-2 and linear.edge and linear.converged == 2
    with open(tmp_path / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in quality_rows())
    text = report.write_report(tmp_path).read_text()
    assert "| dense num_pairs=4 | 0.990 [0.980-1.000] |" in text
    assert "| linear num_pairs=4 | 0.400 [0.300-0.500]◂~ |" in text
    assert "| linear | 64 | num_pairs=4 | 0.01 (0.001, 0.003, 0.01)◂ | 3 | 0.400 |" in text
    assert "Pareto front at T = 64" in text and (tmp_path / "central.png").exists()


def test_the_pareto_front_keeps_the_cells_nothing_beats_in_both():
    rows = quality_rows()
    for r in rows:
        r["time_ms_median"] = {"dense": 2.0, "linear": 1.0}[r["variant"]]
    best = quality_report.best_rates(rows, report._label)
    assert [b.variant for b in quality_report.pareto(best)] == ["linear", "dense"]  # by cost
    for r in rows:
        r["time_ms_median"] = 1.0  # as cheap as linear and more accurate: dense alone
    best = quality_report.best_rates(rows, report._label)
    assert [b.variant for b in quality_report.pareto(best)] == ["dense"]
