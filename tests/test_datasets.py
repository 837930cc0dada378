"""The project's TFDS builders and the grain pipeline, on their `small` configs.

Each invariant is written from the task's definition (Zoology's MQAR, LRA's ListOps), not from
the generator: e.g. ListOps answers are recomputed by a stack evaluator of the token sequence.
"""

import hashlib
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import datasets
from experiments.datasets import listops, mqar, pipeline, pystdlib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def splits(name, data_dir):
    datasets.prepare(name, data_dir)
    source = tfds.data_source(name, data_dir=data_dir)
    return {split: [source[split][i] for i in range(len(source[split]))] for split in source}


def test_mqar_rows_follow_the_definition(data_dir):
    config = next(c for c in datasets.Mqar.BUILDER_CONFIGS if c.name == "small")
    L, V, N = config.seq_len, config.vocab, config.num_pairs
    data = splits("mqar/small", data_dir)
    assert (len(data["train"]), len(data["test"])) == (config.num_train, config.num_test)
    for row in data["train"] + data["test"]:
        x, y, w = row["inputs"], row["targets"], row["weights"]
        assert x.shape == y.shape == w.shape == (L,)
        assert x.dtype == y.dtype == np.int32 and w.dtype == np.float32
        keys, values = x[0 : 2 * N : 2], x[1 : 2 * N : 2]
        assert len(set(keys)) == N and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == N and all(V // 2 <= v < V for v in values)
        queries = np.flatnonzero(w)
        assert set(w) <= {0.0, 1.0} and len(queries) == N
        assert sorted(x[queries]) == sorted(keys)  # every key queried exactly once
        value_of = dict(zip(keys, values, strict=True))
        assert all(y[q] == value_of[x[q]] for q in queries)  # the value that followed it
        assert all(q >= 2 * N and (q - 2 * N) % 2 == 0 for q in queries)
        rest = np.ones(L, bool)
        rest[: 2 * N], rest[queries] = False, False
        assert not x[rest].any() and not y[~np.isin(np.arange(L), queries)].any()
    train = {r["inputs"].tobytes() for r in data["train"]}
    assert not train & {r["inputs"].tobytes() for r in data["test"]}  # disjoint


def test_mqar_gaps_follow_the_power_law():
    # P(gap = g) is proportional to (g + 1)^(a - 1), a = 0.01, over L/2 - N slots.
    config = mqar.MqarConfig(name="t", seq_len=64, vocab=128, num_pairs=1)
    rng = np.random.default_rng(0)
    rows = [mqar.mqar_example(config, rng) for _ in range(4000)]
    gaps = [(np.flatnonzero(row["weights"])[0] - 2) // 2 for row in rows]  # query at 2N + 2g
    p = (np.arange(31) + 1.0) ** (0.01 - 1)
    p /= p.sum()
    for g in (0, 1, 5):
        assert np.mean(np.equal(gaps, g)) == pytest.approx(p[g], abs=0.025)
    assert np.mean(gaps) == pytest.approx(np.dot(np.arange(31), p), rel=0.1)


def test_builds_are_deterministic_per_seed(tmp_path):
    a = splits("mqar/small", str(tmp_path / "a"))
    b = splits("mqar/small", str(tmp_path / "b"))
    for x, y in zip(a["train"], b["train"], strict=True):
        assert np.array_equal(x["inputs"], y["inputs"])
    sizes = dict(seq_len=64, vocab=128, num_pairs=4, num_train=8, num_test=2)
    config = mqar.MqarConfig(name="seed1", seed=1, **sizes)
    datasets.prepare("mqar", str(tmp_path / "c"), config=config)
    other = tfds.data_source("mqar/seed1", data_dir=str(tmp_path / "c"))["train"]
    assert not np.array_equal(other[0]["inputs"], a["train"][0]["inputs"])


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"seq_len": 16, "num_pairs": 5}, "num_pairs"),
        ({"seq_len": 64, "vocab": 64}, "vocab"),
        ({"seq_len": 63}, "seq_len"),
        ({"num_train": 0}, "num_train"),
    ],
)
def test_an_mqar_config_that_cannot_be_built_names_its_fields(tmp_path, fields, named):
    config = mqar.MqarConfig(name="bad", **{"seq_len": 64, "vocab": 128, **fields})
    with pytest.raises(ValueError, match=named):
        datasets.prepare("mqar", str(tmp_path), config=config)


def evaluate(tokens):
    """ListOps by a stack machine over the tokens (independent of the generator's trees)."""
    stack = []
    for token in tokens:
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            operator, *args = stack.pop()
            result = {
                "[MIN": min,
                "[MAX": max,
                "[MED": lambda a: int(np.median(a)),
                "[SM": lambda a: sum(a) % 10,
            }[operator](args)
            if not stack:
                return result
            stack[-1].append(result)
        elif stack:
            stack[-1].append(int(token))
        else:
            return int(token)
    raise AssertionError("unbalanced expression")


def test_listops_answers_match_an_independent_evaluator(data_dir):
    config = next(c for c in datasets.Listops.BUILDER_CONFIGS if c.name == "small")
    data = splits("listops/small", data_dir)
    depths = []
    for row in data["train"] + data["test"]:
        x, y, w = row["inputs"], row["targets"], row["weights"]
        n = int(np.count_nonzero(x))
        assert config.min_len <= n <= config.max_len and not x[n:].any()  # padded with 0
        assert np.flatnonzero(w).tolist() == [n - 1] and w[n - 1] == 1.0
        tokens = [listops.TOKENS[i] for i in x[:n]]
        assert listops.TOKENS[y[n - 1]] == str(evaluate(tokens))
        depth = max(np.cumsum([t.startswith("[") - (t == "]") for t in tokens]))
        assert depth < config.max_depth  # operators only above the leaf-only depth
        depths.append(depth)
    assert max(depths) >= 2  # nested expressions occur


def test_listops_classification_rows_carry_the_independent_answer_as_label(data_dir):
    """LRA's form: the same expressions as the next-token form, the answer as the label at
    position 0, segment ids 1 on the expression and 0 on its padding."""
    classify = splits("listops/classify-small", data_dir)
    plain = splits("listops/small", data_dir)
    pairs = zip(classify["train"] + classify["test"], plain["train"] + plain["test"], strict=True)
    for row, same in pairs:
        x, y, w, ids = row["inputs"], row["targets"], row["weights"], row["segment_ids"]
        n = int(np.count_nonzero(x))
        np.testing.assert_array_equal(x, same["inputs"])
        assert ids.tolist() == [1] * n + [0] * (len(x) - n)
        assert w.tolist() == [1.0] + [0.0] * (len(x) - 1) and not y[1:].any()
        assert y[0] == evaluate([listops.TOKENS[i] for i in x[:n]])


def test_reversal_targets_are_the_source_reversed_through_one_bijection(data_dir):
    """Each target is its source's words in reverse order, each through a word map inferred
    from the data, which must be one bijection onto the target alphabet, then the end token."""
    config = next(c for c in datasets.Reversal.BUILDER_CONFIGS if c.name == "small")
    data = splits("reversal/small", data_dir)
    word_map = {}
    for row in data["train"] + data["test"]:
        x, ids, y, w = row["inputs"], row["segment_ids"], row["targets"], row["weights"]
        n = int(np.count_nonzero(x))
        assert config.min_len <= n <= config.max_len and not x[n:].any()
        assert ids.tolist() == [1] * n + [0] * (len(x) - n)
        assert w.tolist() == [1.0] * (n + 1) + [0.0] * (len(x) - n - 1)
        assert y[n] == 1 and not y[n + 1 :].any()  # the end token, then padding
        for source, target in zip(x[:n][::-1], y[:n], strict=True):
            assert word_map.setdefault(int(source), int(target)) == int(target)
    A = config.alphabet
    assert sorted(word_map) == list(range(2, 2 + A))  # every source word occurs
    assert sorted(word_map.values()) == list(range(2 + A, 2 + 2 * A))  # a bijection


def test_pathfinder_labels_follow_from_the_drawing(data_dir):
    """Recomputed from the image alone (scipy): widen the drawn pixels by one, and the two
    dots lie in one connected piece exactly when the label says they are joined."""
    from scipy import ndimage

    config = next(c for c in datasets.Pathfinder.BUILDER_CONFIGS if c.name == "small")
    data = splits("pathfinder/small", data_dir)
    square = np.ones((3, 3), bool)
    labels = []
    for row in data["train"] + data["test"]:
        image = row["inputs"].reshape(config.size, config.size)
        assert set(np.unique(image)) == {0, 128, 255} and row["segment_ids"].all()
        pieces, _ = ndimage.label(ndimage.binary_dilation(image > 0, square), square)
        dots, count = ndimage.label(image == 255, square)
        assert count == 2 and all((dots == k).sum() == 9 for k in (1, 2))  # two 3 x 3 dots
        joined = len({int(pieces[dots == k][0]) for k in (1, 2)}) == 1
        assert row["targets"][0] == joined and row["weights"].tolist()[:2] == [1.0, 0.0]
        labels.append(joined)
    assert 0.3 < np.mean(labels) < 0.7  # both kinds, about as often


def test_pathfinder_says_when_its_paths_cannot_fit(monkeypatch):
    from experiments.datasets import pathfinder

    monkeypatch.setattr(pathfinder, "RESTARTS", 3)  # (1000 in a build)
    config = pathfinder.PathfinderConfig(name="x", size=8, seq_len=64, distractors=3)
    with pytest.raises(ValueError, match="5 paths of 5 dashes .* in a 8 x 8 image: make"):
        pathfinder.pathfinder_example(config, np.random.default_rng(0))


def test_pystdlib_is_the_stdlib_split_by_group(data_dir):
    data = splits("pystdlib/small", data_dir)
    names = {s: [r["path"].decode() for r in rows] for s, rows in data.items()}
    assert set(names) == {"train", "validation"}
    expected = {rel for rel, _ in pystdlib.stdlib_files(2048)}
    assert set(names["train"]) | set(names["validation"]) == expected
    assert not any(n.startswith(("_sysconfigdata_", "config-")) for n in expected)
    groups = {s: {pystdlib.group_of(n) for n in names[s]} for s in names}
    assert not groups["train"] & groups["validation"]  # a group is on one side only
    for group in groups["validation"]:  # the split is a function of the group alone
        assert int(hashlib.sha1(f"327:{group}".encode()).hexdigest(), 16) % 20 == 0
    assert 0.01 < len(names["validation"]) / len(expected) < 0.12
    root = Path(sysconfig.get_paths()["stdlib"])
    row = data["train"][0]
    assert row["text"].tobytes() == (root / row["path"].decode()).read_bytes()


@pytest.mark.parametrize(
    "path, group",
    [
        ("email/mime/text.py", "email"),
        ("tarfile.py", "tarfile"),
        ("test/test_tarfile.py", "tarfile"),  # a module's tests go with it
        ("test/test_email/test_email.py", "email"),
        ("test/support/os_helper.py", "test/support"),
        ("test/__init__.py", "test/__init__"),
    ],
)
def test_pystdlib_groups_keep_related_files_together(path, group):
    assert pystdlib.group_of(path) == group


def test_pystdlib_data_is_named_by_its_python(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    builder = tfds.builder("pystdlib/small", data_dir=str(tmp_path))
    assert builder.builder_config.name == f"small-py{python}"
    assert builder.builder_config.python == python
    assert python in builder.builder_config.description
    assert f"small-py{python}" in builder.data_dir  # another Python's data sits elsewhere
    assert tfds.builder("pystdlib", data_dir=str(tmp_path)).builder_config.name.endswith(python)
    with pytest.raises(ValueError, match=rf"Python 2\.7.*this is Python {python}"):
        tfds.builder("pystdlib/full-py2.7", data_dir=str(tmp_path))
    other = pystdlib.PyStdlibConfig(name="other", python="2.7")
    with pytest.raises(ValueError, match="python=2.7"):
        datasets.prepare("pystdlib", str(tmp_path), config=other)


@pytest.mark.parametrize("builder", datasets.BUILDERS, ids=lambda b: b.name)
def test_the_generator_matches_its_pinned_fingerprint(builder):
    # Prepared data is kept under data_dir/name/config/version: a generator that changes
    # without a new VERSION would keep serving the old data.
    assert datasets.fingerprint(builder) == builder.FINGERPRINT, (
        f"{builder.name}: generator changed: bump VERSION and update FINGERPRINT "
        f"(to {datasets.fingerprint(builder)}), with RELEASE_NOTES saying what changed"
    )
    assert str(builder.VERSION) in builder.RELEASE_NOTES


def test_the_fingerprint_sees_a_generator_change(monkeypatch):
    pinned = datasets.fingerprint(datasets.Mqar)

    def changed(config, rng):
        row = mqar.mqar_example(config, rng)
        return {**row, "inputs": np.roll(row["inputs"], 1)}

    monkeypatch.setattr(datasets.Mqar, "example", staticmethod(changed))
    assert datasets.fingerprint(datasets.Mqar) != pinned
    monkeypatch.setattr(pystdlib, "SPLIT_SALT", 1)
    assert datasets.fingerprint(datasets.Pystdlib) != datasets.Pystdlib.FINGERPRINT


@pytest.mark.parametrize("builder", datasets.BUILDERS, ids=lambda b: b.name)
def test_the_plain_tfds_client_builds_and_reads_without_tensorflow(tmp_path, builder):
    name = f"{builder.name}/small"
    tfds.builder(name, data_dir=str(tmp_path)).download_and_prepare()  # array_record
    source = tfds.data_source(name, data_dir=str(tmp_path))
    assert set(source) in ({"train", "test"}, {"train", "validation"})
    assert len(source["train"]) > 0 and source["train"][0]


def documents(seed, count, low=3, high=40):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high, count)
    return [{"text": rng.integers(1, 256, n).astype(np.uint8)} for n in lengths]


def test_packed_rows_keep_documents_apart():
    from transformer import ModelConfig, TransformerLM

    docs = documents(0, 30)
    batch = next(pipeline.train_batches(docs, batch_size=4, seed=0, seq_len=32))
    ids, x, y, w = batch["segment_ids"], batch["inputs"], batch["targets"], batch["weights"]
    assert x.shape == ids.shape == (4, 32) and (ids > 0).all()  # concat-then-split: full rows
    texts = {d["text"].astype(np.int32).tobytes() for d in docs}
    for row in range(4):
        for s in np.unique(ids[row]):
            piece = x[row][ids[row] == s]
            assert any(piece.tobytes() in t for t in texts)  # one document's tokens
            tail = y[row][ids[row] == s]
            assert np.array_equal(piece[1:], tail[:-1])  # targets are the next tokens
    assert (w == 1).all()
    # The model sees each document alone: logits of a segment equal those of the segment
    # run by itself (positions restart, no attention across documents).
    sizes = dict(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=16, max_len=32)
    cfg = ModelConfig(vocab_size=256, attention="blockwise", **sizes)
    model = TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    apply = jax.jit(model.apply)
    packed = apply({"params": params}, x, jnp.asarray(ids))
    row, s = 1, ids[1, -1]
    alone = apply({"params": params}, x[row : row + 1, ids[row] == s])
    np.testing.assert_allclose(packed[row, ids[row] == s], alone[0], rtol=1e-5, atol=1e-5)


def test_the_training_iterator_resumes_from_its_state():
    docs = documents(1, 50)
    it = pipeline.train_batches(docs, batch_size=2, seed=3, seq_len=16)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = pipeline.train_batches(docs, batch_size=2, seed=3, seq_len=16)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(5)], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = next(pipeline.train_batches(docs, batch_size=2, seed=4, seq_len=16))
    first = next(pipeline.train_batches(docs, batch_size=2, seed=3, seq_len=16))
    assert not np.array_equal(other["inputs"], first["inputs"])  # the seed shuffles


def test_eval_batches_cover_the_split_once(data_dir):
    datasets.prepare("mqar/small", data_dir)
    source = tfds.data_source("mqar/small", data_dir=data_dir)["test"]
    batches = list(pipeline.eval_batches(source, batch_size=24))
    assert [len(b["inputs"]) for b in batches] == [24, 24, 16]
    rows = np.concatenate([b["inputs"] for b in batches])
    assert np.array_equal(rows, np.stack([source[i]["inputs"] for i in range(len(source))]))
    text = pipeline.eval_batches(documents(2, 10), batch_size=3, seq_len=16)
    total = sum(float(b["weights"].sum()) for b in text)
    assert total == sum(len(d["text"]) - 1 for d in documents(2, 10))  # every target once


def test_eval_subset_spreads_a_token_budget_over_documents():
    docs = [
        {"text": t, "path": str(i)}
        for i, t in enumerate(d["text"] for d in documents(5, 60, 3, 400))
    ]
    subset = pipeline.eval_subset(docs, max_tokens=1000, per_document=64)
    assert sum(len(d["text"]) - 1 for d in subset) == 1000  # scored tokens: the budget
    assert all(2 <= len(d["text"]) <= 65 for d in subset)  # no document gives more than 64
    assert len({d["path"] for d in subset}) == len(subset) >= 1000 // 64
    for d in subset:  # a contiguous window of its document, a short one whole
        text = docs[int(d["path"])]["text"]
        assert d["text"].tobytes() in text.tobytes()
        assert len(text) > 65 or len(d["text"]) == len(text) or d is subset[-1]
    again = pipeline.eval_subset(docs, max_tokens=1000, per_document=64)
    assert all(
        a["text"].tobytes() == b["text"].tobytes() for a, b in zip(subset, again, strict=True)
    )
    other = pipeline.eval_subset(docs, max_tokens=1000, per_document=64, seed=1)
    assert [d["path"] for d in other] != [d["path"] for d in subset]
    everything = pipeline.eval_subset(docs, max_tokens=10**9, per_document=10**6)
    assert sum(len(d["text"]) for d in everything) == sum(len(d["text"]) for d in docs)
    batches = pipeline.eval_batches(subset, batch_size=4, seq_len=32)
    assert sum(float(b["weights"].sum()) for b in batches) == 1000  # what evaluation scores
