"""Training: the loss goes down, a stopped run resumes to the same parameters, SIGTERM saves,
a corrupt checkpoint falls back, a workdir of another model is refused, bad configs exit 2."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import train as train_config
from experiments import evaluate, sample, train
from experiments.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def tiny(data_dir, **changes):
    config = train_config.get_config()
    config.update(dict(data_dir=data_dir, num_steps=12, batch_size=8, warmup_steps=2))
    config.update(dict(eval_every=6, log_every=3, checkpoint_every=4, eval_examples=16))
    config.model.update(dict(num_layers=1, head_dim=16))
    config.update(changes)
    return config


def run(config, workdir, **kwargs):
    out = io.StringIO()
    metrics = train.train(config, workdir, out=out, **kwargs)
    return metrics, out.getvalue()


def saved_params(workdir, step):
    """The params of a checkpoint, read by plain orbax (no project code)."""
    state = ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")
    return state["params"]


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def rows(workdir, tag):
    with open(Path(workdir) / "metrics.csv") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["tag"] == tag]


def test_training_lowers_the_loss_and_writes_its_files(data_dir, tmp_path):
    config = tiny(data_dir, num_steps=60, eval_every=30, learning_rate=3e-3, warmup_steps=5)
    metrics, out = run(config, tmp_path)
    losses = rows(tmp_path, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.3
    assert set(metrics) == {"eval/loss", "eval/accuracy"} and metrics["eval/loss"] < losses[0][1]
    assert "parameters, mesh data=1 x seq=1; from scratch" in out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 128 and saved["params"] > 0  # from the dataset
    assert {s for s, _ in rows(tmp_path, "eval/accuracy")} == {30, 60}
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [52, 56, 60]


def test_a_stopped_run_resumes_to_the_same_parameters(data_dir, tmp_path):
    config = tiny(data_dir)
    run(config, tmp_path / "whole")
    _, out = run(config, tmp_path / "parts", stop_after=5)  # stops after step 5 (saved)
    assert (tmp_path / "parts" / "checkpoints" / "5").exists()
    _, out = run(config, tmp_path / "parts")
    assert "resuming at step 5" in out
    assert_same_params(saved_params(tmp_path / "whole", 12), saved_params(tmp_path / "parts", 12))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(data_dir, tmp_path):
    config = tiny(data_dir)
    run(config, tmp_path, stop_after=8)  # checkpoints 4 and 8
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    _, out = run(config, tmp_path)
    assert "checkpoint 8 is unreadable" in out and "resuming at step 4" in out
    assert (tmp_path / "corrupt" / "8").exists()
    whole = tmp_path / "whole"
    run(config, whole)
    assert_same_params(saved_params(whole, 12), saved_params(tmp_path, 12))


def test_a_workdir_of_another_model_is_refused(data_dir, tmp_path):
    run(tiny(data_dir, num_steps=4, warmup_steps=1), tmp_path)
    before = (tmp_path / "config.json").read_text()
    config = tiny(data_dir, num_steps=4, warmup_steps=1)
    config.model.num_layers = 2
    with pytest.raises(train.WorkdirMismatch, match="model.num_layers: 1 there, 2 here"):
        run(config, tmp_path)
    # Another data stream or optimizer-state structure cannot resume these checkpoints either.
    for change, needle in [({"batch_size": 16}, "batch_size: 8 there, 16 here"),
                           ({"grad_clip": 0.0}, "grad_clip: 1.0 there, 0.0 here")]:  # fmt: skip
        with pytest.raises(train.WorkdirMismatch, match=needle):
            run(tiny(data_dir, num_steps=4, warmup_steps=1, **change), tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


def test_logits_at_the_weighted_positions_give_the_same_sums(data_dir):
    import dataclasses

    from experiments.datasets import pipeline

    setup = train.setup(tiny(data_dir))
    assert setup.targeted == 4  # mqar/small: N = 4 queries per row of 64
    params = train.init_state(setup)["params"]
    batch = next(pipeline.train_batches(setup.train_source, batch_size=8, seed=0))
    _, targeted = train.make_steps(setup)
    _, full = train.make_steps(dataclasses.replace(setup, targeted=None))
    for a, b in zip(targeted(params, batch), full(params, batch), strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-5)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"warmup_steps": 20}, "warmup_steps"),
        ({"dataset": "nope/small"}, "dataset"),
        ({"eval_split": "validation"}, "eval_split"),
        ({"match_params": 100, "match_field": "num_heads"}, "match_field"),
        ({"match_params": 100}, "match_params"),  # below the smallest model
    ],
)
def test_bad_values_name_the_field(data_dir, tmp_path, changes, field):
    with pytest.raises(ConfigError) as e:
        run(tiny(data_dir, **changes), tmp_path)
    assert e.value.field == field
    assert not (tmp_path / "config.json").exists()


def cli(data_dir, workdir, *overrides):
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/train.py"]
    cmd += [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.batch_size=8"]
    cmd += ["--config.model.num_layers=1", "--config.eval_examples=16", *overrides]
    return cmd


def test_cli_bad_config_exits_2(data_dir, tmp_path):
    for override, needle in [("--config.nosuch=1", "nosuch"), ("--config.model.norm=x", "norm")]:
        command = cli(data_dir, tmp_path, override)
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and needle in result.stderr, result.stderr


def logged_steps(workdir):
    return [s for s, _ in rows(workdir, "train/loss")] if (workdir / "metrics.csv").exists() else []


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(data_dir, tmp_path):
    endless = ["--config.num_steps=100000", "--config.eval_every=100000", "--config.log_every=1"]
    command = cli(data_dir, tmp_path, *endless, "--config.checkpoint_every=100000")
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process = subprocess.Popen(command, cwd=ROOT, **pipe)
    deadline = time.time() + 120
    while time.time() < deadline and max(logged_steps(tmp_path), default=0) < 3:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    (saved,) = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert saved >= 3 and f"stopped by signal {signal.SIGTERM.value} at step {saved}" in output
    command = cli(data_dir, tmp_path, *endless, "--stop_after=2")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {saved}" in result.stdout
    assert (tmp_path / "checkpoints" / str(saved + 2)).exists()


def test_an_encoder_classifier_trains_on_listops_classification_rows(data_dir, tmp_path):
    """LRA's protocol: a bidirectional encoder pools each row and classifies it; the accuracy
    counts rows; a model.num_classes other than the dataset's is refused, named."""
    config = tiny(data_dir, dataset="listops/classify-small", num_steps=30, eval_every=30,
                  learning_rate=3e-3, warmup_steps=3)  # fmt: skip
    config.model.update(causal=False, mlp_dim=32)
    metrics, _ = run(config, tmp_path)
    losses = rows(tmp_path, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.1
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    assert saved["num_classes"] == 10 and saved["causal"] is False
    assert metrics["eval/accuracy"] in {k / 16 for k in range(17)}  # 16 rows, one label each
    with pytest.raises(ValueError, match="classifier"):
        sample.sample(tmp_path, "3,4", max_new_tokens=2, temperature=0, out=io.StringIO())
    config.model.num_classes = 3
    with pytest.raises(ConfigError, match="model.num_classes"):
        train.setup(config)
    leaking = tiny(data_dir)  # MQAR: next-token rows, whose targets an encoder would read
    leaking.model.causal = False
    with pytest.raises(ConfigError, match="model.causal.*would read the targets"):
        train.setup(leaking)


def test_the_encoder_decoder_learns_the_reversal_translation(data_dir, tmp_path):
    config = tiny(data_dir, dataset="reversal/small", num_steps=40, eval_every=40,
                  learning_rate=3e-3, warmup_steps=4)  # fmt: skip
    config.model.update(mlp_dim=32, cross_attention="blockwise")
    metrics, out = run(config, tmp_path)
    losses = rows(tmp_path, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.3 and "reversal/small" in out
    params = saved_params(tmp_path, 40)
    assert {"encoder", "decoder", "embed"} <= set(params)
    assert "cross_attention" in params["decoder"]["block_0"]
    out = io.StringIO()  # the sampler writes a translation of the source's ids
    (written,) = sample.sample(tmp_path, "3,4,5", max_new_tokens=4, temperature=0, out=out)
    ids = [int(t) for t in written.split(",")]  # up to the end token (1), if it wrote one
    assert 1 <= len(ids) <= 4 and 1 not in ids[:-1] and (len(ids) == 4 or ids[-1] == 1)
    assert "(dense, step 40)" in out.getvalue()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert sample.until_end(np.array([5, 6, 1, 7, 1]), saved).tolist() == [5, 6, 1]
    assert sample.until_end(np.array([5, 6]), saved).tolist() == [5, 6]
    with pytest.raises(evaluate.CannotEvaluate, match="encoder-decoder"):
        evaluate.evaluate(tmp_path, evaluate.Args([32]), out)


SHIPPED = ["train", "mqar", "listops", "lra_listops", "lra_pathfinder", "lm", "passkey"]


@pytest.mark.parametrize("name", [*SHIPPED, "reversal"])
def test_shipped_training_configs_are_valid(name, tmp_path):
    import importlib

    import tensorflow_datasets as tfds

    import experiments.datasets  # noqa: F401  (registers the builders)
    from transformer import ModelConfig

    config = importlib.import_module(f"configs.{name}").get_config()
    train._check(config)
    tfds.builder(config.dataset, data_dir=str(tmp_path))  # a known name and config; not built
    fields = {**config.model.to_dict(), "vocab_size": 256, "max_len": 128}
    ModelConfig(**fields, attention_options=config.options[fields["attention"]].to_dict())


def test_sample_generates_from_the_newest_checkpoint(data_dir, tmp_path):
    from experiments import sample

    text = tiny(data_dir, dataset="pystdlib/small", eval_split="validation", seq_len=32)
    text.model.attention = "sliding_window,dense"  # a hybrid: each block its own kernel
    text.model.num_layers = 2
    text.options.sliding_window.update(dict(window=8, block_q=8, block_k=8))
    run(text, tmp_path / "lm")
    out = io.StringIO()
    samples = sample.sample(tmp_path / "lm", "def ", max_new_tokens=6, temperature=0.0,
                            num_samples=2, out=out)  # fmt: skip
    assert len(samples) == 2 and samples[0] == samples[1] and samples[0].startswith("def ")
    assert "step 12" in out.getvalue() and "tokens/s" in out.getvalue()
    task = tiny(data_dir)  # MQAR: token ids in, token ids out
    run(task, tmp_path / "mqar")
    (ids,) = sample.sample(tmp_path / "mqar", "3,7,100", max_new_tokens=2, temperature=0.0, out=out)
    assert ids.startswith("3,7,100,") and len(ids.split(",")) == 5
    with pytest.raises(ValueError, match=r"in \[0, 128\), got \[3, 700\]"):
        sample.sample(tmp_path / "mqar", "3,700", max_new_tokens=2, temperature=0.0, out=out)
    with pytest.raises(ValueError, match="comma-separated token ids"):
        sample.sample(tmp_path / "mqar", "def", max_new_tokens=2, temperature=0.0, out=out)
    with pytest.raises(sample.NoModel, match="train one first"):
        sample.sample(tmp_path / "empty", "def", max_new_tokens=2, temperature=0.0, out=out)


def test_multi_host_start_up_only_when_asked(monkeypatch):
    from experiments import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert not distributed.initialize() and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize()
    assert calls == [dict(coordinator_address="host0:1234", num_processes=2, process_id=1)]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    assert distributed.initialize(enable=True, process_id=0)  # the rest: JAX's detection
    assert calls[-1] == dict(num_processes=2, process_id=0)


def test_a_mesh_of_more_devices_than_there_are_names_the_field():
    from experiments import distributed

    assert dict(distributed.make_mesh().shape) == {"data": jax.device_count(), "seq": 1}
    with pytest.raises(ConfigError, match=r"config.mesh: data=2 x seq=1 = 2, but there are 1"):
        distributed.make_mesh(data=2)
    with pytest.raises(ConfigError, match=r"config.mesh.seq: must be an int >= 0"):
        distributed.make_mesh(seq=-1)


def test_a_restore_error_that_is_not_a_read_error_propagates_and_moves_nothing(data_dir, tmp_path):
    from experiments import checkpoints
    from experiments.datasets import pipeline

    config = tiny(data_dir)
    run(config, tmp_path, stop_after=8)  # checkpoints 4 and 8, both readable
    other = tiny(data_dir)
    other.model.num_layers = 2  # a model that no longer matches the saved parameters
    setup = train.setup(other)
    abstract = jax.eval_shape(lambda: train.init_state(setup))
    data = pipeline.train_batches(setup.train_source, batch_size=8, seed=0)
    manager = checkpoints.manager(tmp_path / "checkpoints")
    with pytest.raises(checkpoints.RestoreError, match="checkpoint 8 .* is readable"):
        checkpoints.restore(manager, abstract, data, io.StringIO())
    manager.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert not (tmp_path / "corrupt").exists()


def test_no_readable_checkpoint_stops_the_run_and_moves_nothing(data_dir, tmp_path):
    config = tiny(data_dir)
    run(config, tmp_path, stop_after=8)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name in ("state", "data"):
            f.write_bytes(b"garbage")
    before = (tmp_path / "metrics.csv").read_text()
    command = cli(data_dir, tmp_path, "--config.num_steps=12", "--config.warmup_steps=2",
                  "--config.eval_every=6", "--config.log_every=3", "--config.checkpoint_every=4",
                  "--config.model.head_dim=16")  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no checkpoint" in result.stderr and "nothing was moved" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert not (tmp_path / "corrupt").exists()
    assert (tmp_path / "metrics.csv").read_text() == before


def test_a_resume_after_a_crash_logs_each_step_once_and_keeps_the_history(data_dir, tmp_path):
    import shutil

    config = tiny(data_dir)
    run(config, tmp_path, stop_after=8)  # logged up to step 8, checkpoints 4 and 8
    first = json.loads((tmp_path / "config.json").read_text())
    shutil.rmtree(tmp_path / "checkpoints" / "8")  # as if killed before saving step 8
    _, out = run(config, tmp_path)
    assert "resuming at step 4" in out
    with open(tmp_path / "metrics.csv") as f:
        keys = [(r["step"], r["tag"]) for r in csv.DictReader(f)]
    assert len(keys) == len(set(keys))
    assert [s for s, _ in rows(tmp_path, "eval/accuracy")] == [6, 12]
    assert [s for s, _ in rows(tmp_path, "model/params")] == [0]
    assert json.loads((tmp_path / "config.json").read_text()) == first  # never rewritten
    assert set(first["versions"]) == {"git_commit", "jax_version"}
    (resume,) = [json.loads(line) for line in (tmp_path / "resumes.jsonl").open()]
    assert resume["step"] == 4 and resume["changed"] == {} and resume["config"]["versions"]


def test_a_finished_run_trains_and_writes_nothing_and_refuses_another_schedule(data_dir, tmp_path):
    config = tiny(data_dir, num_steps=8)
    run(config, tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _, out = run(config, tmp_path)
    assert "nothing to train" in out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    with pytest.raises(train.WorkdirMismatch, match="learning_rate: 0.001 there, 0.003 here"):
        run(tiny(data_dir, num_steps=8, learning_rate=3e-3), tmp_path)
    with pytest.raises(train.WorkdirMismatch, match="--allow_changes"):
        run(tiny(data_dir, num_steps=12), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    _, out = run(tiny(data_dir, num_steps=12), tmp_path, allow_changes=True)
    assert "resuming with num_steps 8 -> 12" in out and "resuming at step 8" in out
    (resume,) = [json.loads(line) for line in (tmp_path / "resumes.jsonl").open()]
    assert resume["changed"] == {"num_steps": {"there": 8, "here": 12}}


def test_training_stops_at_the_threshold_and_records_its_curve(data_dir, tmp_path):
    config = tiny(data_dir, num_steps=300, eval_every=10, learning_rate=3e-3, warmup_steps=5)
    config.update(dict(threshold=0.1, checkpoint_every=1000))
    result = train.train_and_evaluate(config, tmp_path, out=io.StringIO())
    curve = result["eval_curve"]
    assert [s for s, _ in curve] == list(range(10, result["step"] + 1, 10))
    assert result["converged"] and result["steps_to_threshold"] == result["step"] < 300
    assert curve[-1][1] >= 0.1 and all(v < 0.1 for _, v in curve[:-1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_to_threshold"] == result["step"] and summary["eval_curve"] == curve
    assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir()] == [result["step"]]
    _, out = run(config, tmp_path)
    assert "nothing to train" in out


def test_logged_training_metrics_average_the_window_and_time_apart_the_compile(data_dir, tmp_path):
    run(tiny(data_dir, log_every=1, eval_every=12), tmp_path / "each")
    run(tiny(data_dir, log_every=4, eval_every=6), tmp_path / "window")  # evals inside windows
    each = dict(rows(tmp_path / "each", "train/loss"))
    window = rows(tmp_path / "window", "train/loss")
    assert [s for s, _ in window] == [4, 8, 12]  # the same steps, averaged over each window
    for step, value in window:
        assert value == pytest.approx(np.mean([each[s] for s in range(step - 3, step + 1)]))
    assert [s for s, _ in rows(tmp_path / "window", "train/first_step_s")] == [4]  # once
    rates = dict(rows(tmp_path / "window", "train/tokens_per_s"))
    assert set(rates) == {4, 8, 12} and all(v > 0 for v in rates.values())
    elapsed = [v for _, v in rows(tmp_path / "window", "train/elapsed_s")]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_the_model_is_checked_before_the_dataset_is_built_and_task_rows_keep_their_length(
    data_dir, tmp_path
):
    fresh = tmp_path / "tfds"
    config = tiny(str(fresh))
    config.model.norm = "x"
    with pytest.raises(ConfigError) as e:
        train.setup(config)
    assert e.value.field == "model" and not fresh.exists()
    with pytest.raises(ConfigError, match="rows of 64 tokens") as e:
        train.setup(tiny(data_dir, seq_len=128))
    assert e.value.field == "seq_len"


def test_sample_falls_back_past_an_unreadable_checkpoint_and_moves_nothing(data_dir, tmp_path):
    from experiments import sample

    run(tiny(data_dir), tmp_path, stop_after=8)
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    out = io.StringIO()
    sample.sample(tmp_path, "3,7", max_new_tokens=2, temperature=0.0, out=out)
    assert "checkpoint 8 is unreadable" in out.getvalue() and "step 4" in out.getvalue()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]


def test_a_listops_run_saved_before_its_classification_field_resumes(data_dir, tmp_path):
    run(tiny(data_dir, dataset="listops/small"), tmp_path, stop_after=4)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["dataset_config"]["classification"]  # a dataset field added since, its default
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _, out = run(tiny(data_dir, dataset="listops/small"), tmp_path, stop_after=8)
    assert "resuming at step 4" in out


def test_a_workdir_of_an_older_version_resumes_and_a_torn_history_line_is_skipped(
    data_dir, tmp_path
):
    from experiments import workdir

    run(tiny(data_dir), tmp_path, stop_after=4)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["dataset_config"]  # written before the field existed
    for name in ("attention_sinks", "causal", "cross_attention_options", "encoder_attention"):
        del saved["model"][name]  # model fields added since, at their defaults
    options = saved["model"]["attention_options"]  # and kernel options, at their defaults
    saved["model"]["attention_options"] = [o for o in options if o[0] not in ("bias", "softcap")]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    sinks = tiny(data_dir)
    sinks.model.attention_sinks = True  # not what the saved run used: refused
    with pytest.raises(train.WorkdirMismatch, match="model.attention_sinks: None there, True"):
        run(sinks, tmp_path)
    _, out = run(tiny(data_dir), tmp_path, stop_after=4)
    assert "resuming at step 4" in out
    with open(tmp_path / "resumes.jsonl", "a") as f:
        f.write('{"torn": ')  # a crash while the row was written
    _, out = run(tiny(data_dir), tmp_path)
    assert "resuming at step 8" in out
    rows = workdir.read_jsonl(tmp_path / "resumes.jsonl")
    assert [r["step"] for r in rows] == [4, 8]


def test_an_error_that_is_not_a_read_error_is_raised_not_taken_for_corruption(
    data_dir, tmp_path, monkeypatch
):
    from experiments import checkpoints

    run(tiny(data_dir), tmp_path, stop_after=8)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("host out of memory")

    manager = checkpoints.manager(tmp_path / "checkpoints")
    monkeypatch.setattr(manager, "restore", out_of_memory)
    with pytest.raises(MemoryError):  # sampling and evaluation restore without a target
        checkpoints.restore(manager, None, out=io.StringIO(), move_unreadable=False)
    manager.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]


def test_a_readable_checkpoint_of_another_shape_stops_the_cli_with_exit_1(data_dir, tmp_path):
    run(tiny(data_dir), tmp_path, stop_after=4)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["head_dim"] = 32  # config.json edited: the checkpoint no longer fits
    (tmp_path / "config.json").write_text(json.dumps(saved))
    command = cli(data_dir, tmp_path, "--config.model.head_dim=32", "--config.num_steps=12",
                  "--config.warmup_steps=2", "--config.checkpoint_every=4")  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "checkpoint 4" in result.stderr and "is readable but does not restore" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert not (tmp_path / "corrupt").exists()
