"""The passkey builder, checked against the task's definition: the answer is the needle's key,
the needle sits where `depth` says, only the answer is scored."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import datasets
from experiments.datasets import passkey


def rows(config, count=200, seed=0):
    return [
        passkey.passkey_example(config, np.random.default_rng([seed, 0, i])) for i in range(count)
    ]


@pytest.mark.parametrize("filler", passkey.FILLERS)
def test_the_answer_is_the_needles_key(filler):
    config = passkey.PasskeyConfig(name="t", seq_len=64, digits=5, filler=filler)
    L, D = config.seq_len, config.digits
    for row in rows(config):
        x, y, w = row["inputs"], row["targets"], row["weights"]
        assert x.shape == y.shape == w.shape == (L,)
        assert x.dtype == y.dtype == np.int32 and w.dtype == np.float32
        (at,) = np.flatnonzero(x == passkey.NEEDLE)
        (query,) = np.flatnonzero(x == passkey.QUERY)
        key = x[at + 1 : at + 1 + D]
        assert ((passkey.DIGIT <= key) & (key < passkey.DIGIT + 10)).all()
        assert query == L - D - 1 and np.array_equal(x[query + 1 :], key)
        answer = np.arange(query, L - 1)  # QUERY and the digits before the last
        assert np.array_equal(np.flatnonzero(w), answer) and set(w) == {0.0, 1.0}
        assert np.array_equal(y[answer], key)  # the needle's digits, in order
        assert np.array_equal(y[answer], x[answer + 1])  # each is the next token
        assert not y[w == 0].any()
        filler = np.delete(x, [*range(at, at + D + 1), *range(query, L)])
        assert len(filler) == passkey.free_positions(config)
        assert (filler >= passkey.FILLER).all() and (filler < config.vocab_size()).all()
    assert config.max_targets() == D


def test_the_repeated_filler_is_one_sentence_over_and_over():
    config = passkey.PasskeyConfig(name="t", seq_len=64, filler_vocab=7, depth=0.5)
    x = rows(config, 1)[0]["inputs"]
    (at,) = np.flatnonzero(x == passkey.NEEDLE)
    filler = np.delete(x, [*range(at, at + 6), *range(64 - 6, 64)])
    assert np.array_equal(filler, passkey.FILLER + np.arange(len(filler)) % 7)


def test_a_random_depth_spans_the_context():
    config = passkey.PasskeyConfig(name="t", seq_len=128, digits=5)
    F = passkey.free_positions(config)
    depths = np.array([np.flatnonzero(r["inputs"] == passkey.NEEDLE)[0] for r in rows(config, 400)])
    assert depths.min() >= 0 and depths.max() <= F
    for low, high in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.01)):  # early, middle and late
        share = np.mean((depths >= low * F) & (depths < high * F))
        assert share == pytest.approx(1 / 3, abs=0.08)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_a_fixed_depth_places_the_needle_there(depth):
    config = passkey.PasskeyConfig(name="t", seq_len=100, digits=4, depth=depth)
    F = passkey.free_positions(config)
    for row in rows(config, 20):
        assert np.flatnonzero(row["inputs"] == passkey.NEEDLE).tolist() == [round(depth * F)]
    if depth == 1.0:  # the needle's key ends right before the query
        assert row["inputs"][F + 4 + 1] == passkey.QUERY


def test_builds_are_deterministic_per_seed(tmp_path):
    def build(where, seed):
        config = passkey.PasskeyConfig(name=f"seed{seed}", seq_len=64, num_train=16, num_test=4)
        config.seed = seed
        datasets.prepare("passkey", str(tmp_path / where), config=config)
        source = tfds.data_source(f"passkey/seed{seed}", data_dir=str(tmp_path / where))
        return np.stack([source["train"][i]["inputs"] for i in range(16)])

    a, b, other = build("a", 0), build("b", 0), build("c", 1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, other)


def test_the_small_config_builds_disjoint_splits(tmp_path):
    datasets.prepare("passkey/small", str(tmp_path))
    source = tfds.data_source("passkey/small", data_dir=str(tmp_path))
    small = next(c for c in datasets.Passkey.BUILDER_CONFIGS if c.name == "small")
    assert (len(source["train"]), len(source["test"])) == (small.num_train, small.num_test)
    train = {source["train"][i]["inputs"].tobytes() for i in range(len(source["train"]))}
    assert not train & {source["test"][i]["inputs"].tobytes() for i in range(len(source["test"]))}


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"seq_len": 11, "digits": 5}, "seq_len"),  # 2 * 5 + 2 = 12 tokens at least
        ({"digits": 0}, "digits"),
        ({"depth": 1.5}, "depth"),
        ({"depth": -0.1}, "depth"),
        ({"filler": "lorem"}, "filler"),
        ({"filler_vocab": 0}, "filler_vocab"),
    ],
)
def test_a_config_that_cannot_be_built_names_its_fields(tmp_path, fields, named):
    config = passkey.PasskeyConfig(name="bad", **{"seq_len": 64, **fields})
    with pytest.raises(ValueError, match=named):
        datasets.prepare("passkey", str(tmp_path), config=config)


def test_the_shortest_row_fits_needle_query_and_answer():
    config = passkey.PasskeyConfig(name="t", seq_len=12, digits=5, depth=0.0)
    config.check()
    x = rows(config, 1)[0]["inputs"]
    assert x[0] == passkey.NEEDLE and x[6] == passkey.QUERY and np.array_equal(x[1:6], x[7:])
