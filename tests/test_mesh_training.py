"""Sharded training on 8 simulated CPU devices (`pytest -m mesh`, see conftest.py): a step on a
(data, seq) mesh with ring attention equals the single-device step, and a checkpoint written
on one mesh restores on another and training continues as if uninterrupted."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_train import run, saved_params, tiny

from experiments import distributed, train
from experiments.configlib import ConfigError
from experiments.datasets import pipeline
from transformer import ModelConfig

pytestmark = pytest.mark.mesh


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def ring_config(data_dir, **changes):
    config = tiny(data_dir, **changes)
    config.model.attention = "ring"
    config.options.ring.update(dict(block_q=8, block_k=8))
    return config


def test_a_sharded_step_equals_the_single_device_step(data_dir):
    setup = train.setup(ring_config(data_dir))
    state = train.init_state(setup)
    batch = next(pipeline.train_batches(setup.train_source, batch_size=8, seed=0))
    step = train.make_steps(setup)[0]
    want, want_metrics = jax.jit(step)(state, batch)  # one device: ring runs as blockwise
    mesh = distributed.make_mesh(data=2, seq=4)
    with jax.set_mesh(mesh):
        args = distributed.place_state(mesh, state), distributed.place_batch(mesh, batch)
        sharded = jax.jit(step)
        assert "collective-permute" in sharded.lower(*args).compile().as_text()  # it rings
        got, got_metrics = sharded(*args)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_one_mesh_continues_on_another(data_dir, tmp_path):
    kw = dict(num_steps=4, checkpoint_every=2, eval_every=4)
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    run(ring_config(data_dir, **kw), whole)  # data=8 (the default): the rows split 8 ways
    run(ring_config(data_dir, **kw), moved, stop_after=2)
    _, log = run(ring_config(data_dir, mesh=dict(data=2, seq=4), **kw), moved)
    assert "mesh data=2 x seq=4; resuming at step 2" in log
    for a, b in zip(*(jax.tree.leaves(saved_params(w, 4)) for w in (whole, moved)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_mesh_that_does_not_fit_names_the_field(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"config.mesh: data=3 x seq=2 = 6, but there are 8"):
        train.train(ring_config(data_dir, mesh=dict(data=3, seq=2)), tmp_path)
    with pytest.raises(ConfigError, match=r"config.batch_size: 12 rows do not split"):
        train.train(ring_config(data_dir, batch_size=12), tmp_path)
    mesh = distributed.make_mesh(data=2, seq=4)
    distributed.check_batch(mesh, 8, 40, ModelConfig(attention="dense"))
    ring = ModelConfig(attention="ring,dense")  # a hybrid with ring blocks rings too
    with pytest.raises(ConfigError, match=r"rows of 36 positions: T=36 \(a multiple of 8"):
        distributed.check_batch(mesh, 8, 36, ring)
    contiguous = ring.replace(attention_options={"ring": {"layout": "contiguous"}})
    distributed.check_batch(mesh, 8, 36, contiguous)
    encoder = ModelConfig(attention="ring", causal=False)  # a full ring: one chunk per device
    distributed.check_batch(mesh, 8, 36, encoder)
    with pytest.raises(ConfigError, match=r"37 positions \(the row and its CLS position"):
        distributed.check_batch(mesh, 8, 36, encoder.replace(num_classes=3, pooling="cls"))
    translator = ModelConfig(attention="dense", encoder_attention="ring")
    distributed.check_batch(mesh, 8, 36, translator, seq2seq=True)  # the encoder: full ring
    with pytest.raises(ConfigError, match=r"ring attention in the decoder cannot cut"):
        distributed.check_batch(mesh, 8, 36, ModelConfig(attention="ring"), seq2seq=True)
    with pytest.raises(ConfigError, match=r"rows of 38 positions do not split over seq=4"):
        distributed.check_batch(mesh, 8, 38, ModelConfig(attention="dense"))
