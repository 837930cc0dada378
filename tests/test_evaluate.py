"""experiments.evaluate: a trained model at its training length and beyond."""

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from experiments import evaluate, train
from experiments.datasets import pipeline
from tests.test_train import ROOT
from tests.test_train import tiny as train_tiny


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny(data_dir, **changes):
    """test_train's tiny run, 6 steps with one checkpoint and one evaluation."""
    short = dict(num_steps=6, warmup_steps=1, eval_every=6, checkpoint_every=6, eval_examples=8)
    return train_tiny(data_dir, **{**short, **changes})


def test_a_text_model_is_evaluated_at_twice_its_training_length(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PER_DOCUMENT", 16)  # windows of 16 tokens per file, at least
    config = tiny(data_dir, dataset="pystdlib/small", eval_split="validation", seq_len=32)
    config.model.vocab_size = 256
    train.train(config, tmp_path, out=io.StringIO())
    out = io.StringIO()
    args = evaluate.Args([32, 64], max_tokens=512, batch_tokens=256)
    rows = evaluate.evaluate(tmp_path, args, out)
    assert [r["length"] for r in rows] == [32, 64] and rows[1]["train_length"] == 32
    for row in rows:
        assert math.isfinite(row["loss"]) and row["bits_per_token"] == row["loss"] / math.log(2)
        assert 0 < row["tokens"] <= 512 and all(
            math.isfinite(v) for v in row["position_loss"].values()
        )
    # Windows as long as the longest length, past PER_DOCUMENT: its positions all occur, and
    # every length scores the same tokens.
    assert [r["per_document"] for r in rows] == [64, 64] and rows[0]["tokens"] == rows[1]["tokens"]
    assert "16-31" in rows[0]["position_loss"] and "32-63" not in rows[0]["position_loss"]
    assert "32-63" in rows[1]["position_loss"]
    saved = [json.loads(line) for line in (tmp_path / "evaluation.jsonl").open()]
    assert [r["length"] for r in saved] == [32, 64] and saved[0]["step"] == 6
    assert "| 64 | 2 |" in out.getvalue()
    out = io.StringIO()
    evaluate.evaluate(tmp_path, args, out)  # a rerun reuses the rows of the same step and code
    assert "length 64: reused" in out.getvalue()
    assert len((tmp_path / "evaluation.jsonl").read_text().splitlines()) == 2


def test_a_task_model_is_evaluated_on_rows_built_at_the_length_with_more_pairs(data_dir, tmp_path):
    train.train(tiny(data_dir), tmp_path, out=io.StringIO())  # mqar/small: L=64, N=4
    args = evaluate.Args([64, 96], max_examples=16)  # (MQAR needs vocab 128 > length)
    rows = evaluate.evaluate(tmp_path, args, io.StringIO())
    assert [r["data"]["num_pairs"] for r in rows] == [4, 6]
    assert [r["tokens"] for r in rows] == [16 * 4, 16 * 6]  # one target per query
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_learned_positions_refuse_a_longer_length_naming_max_len(data_dir, tmp_path):
    config = tiny(data_dir)
    config.model.positions = "learned"
    train.train(config, tmp_path, out=io.StringIO())
    with pytest.raises(evaluate.CannotEvaluate, match="max_len=64"):
        evaluate.evaluate(tmp_path, evaluate.Args([96], max_examples=8), io.StringIO())
    command = [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
               "--lengths=96", "--max_examples=8"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "max_len=64" in result.stderr


def test_positions_restart_at_each_document():
    ids = np.array([[1, 1, 1, 2, 2, 0]])
    assert evaluate.positions_in_document(ids, ids.shape).tolist() == [[0, 1, 2, 0, 1, 0]]
    assert evaluate.bucket(np.array([0, 1, 2, 3, 4, 7, 8])).tolist() == [0, 1, 2, 2, 3, 3, 4]


def test_the_report_tabulates_the_training_runs_it_finds(data_dir, tmp_path):
    from experiments import report

    runs = {
        "dense": {},
        "linear": {},
        "dense-s1": dict(seed=1),
        "dense-lr": dict(learning_rate=1e-2),
    }
    runs["hybrid"] = dict(model=dict(attention="dense,linear", num_layers=2))
    for name, changes in runs.items():
        config = tiny(data_dir, **{k: v for k, v in changes.items() if k != "model"})
        config.model.update({"attention": name.split("-")[0], **changes.get("model", {})})
        train.train(config, tmp_path / "runs" / name, out=io.StringIO())
    (row,) = evaluate.evaluate(tmp_path / "runs" / "linear", evaluate.Args([64]), io.StringIO())
    assert report.main([str(tmp_path / "runs")]) == 0
    text = (tmp_path / "runs" / "runs.md").read_text()
    final = json.loads((tmp_path / "runs" / "linear" / "summary.json").read_text())["metrics"]
    assert "| dense | mqar/small | dense |" in text
    assert (
        f"| eval/accuracy | {final['eval/accuracy']:.4f} | True | - | {row['accuracy']:.4f} |"
        in text
    )
    assert "T=64" in text and (tmp_path / "runs" / "runs.png").exists()
    header = (tmp_path / "runs" / "runs.csv").read_text().splitlines()[0]
    assert header.endswith("by_length")  # though the first run was not evaluated
    # The protocol table: the dense runs are one setting, over two seeds and two rates.
    acc = {
        name: json.loads((tmp_path / "runs" / name / "summary.json").read_text())["metrics"][
            "eval/accuracy"
        ]
        for name in runs
    }
    low = [acc["dense"], acc["dense-s1"]]  # rate 1e-3
    best = "0.001" if sum(low) / 2 >= acc["dense-lr"] else "0.01"  # ties: the smaller
    lines = [line for line in text.splitlines() if "| mqar/small | dense | eval/acc" in line]
    assert len(lines) == 2 and f"| 2 | {sum(low) / 2:.4f} [{min(low):.4f}-" in lines[0]
    assert f"| **{best}**◂ |" in "\n".join(lines)  # both rates are the grid's edges
    assert "| mqar/small | dense+linear | eval/accuracy | **0.001**◂ | 1 |" in text


def test_passkey_is_evaluated_on_a_length_by_depth_grid(data_dir, tmp_path):
    train.train(tiny(data_dir, dataset="passkey/small"), tmp_path, out=io.StringIO())
    out = io.StringIO()
    args = evaluate.Args([64, 128], max_examples=8, depths=[0.0, 1.0])
    rows = evaluate.evaluate(tmp_path, args, out)
    assert [(r["length"], r["data"]["depth"]) for r in rows] == [
        (64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)
    ]  # fmt: skip
    assert all(r["tokens"] == 8 * r["data"]["digits"] for r in rows)  # the key's digits
    assert "| depth | 64 | 128 |" in out.getvalue() and (tmp_path / "passkey.png").exists()
    assert "| 128 | 1.0 | 2 |" in out.getvalue()  # the per-length table names the depth
    mqar = {"dataset": "mqar/small", "dataset_config": {"seq_len": 64, "num_pairs": 4}}
    with pytest.raises(evaluate.CannotEvaluate, match="no needle depth"):
        evaluate.fields_at(mqar, 64, args, depth=0.5)
