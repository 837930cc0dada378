"""What the project's builders share, and the fixed-length rows of the synthetic tasks.

Every builder writes array_record by default (`tfds.builder(...).download_and_prepare()` needs
no TensorFlow) and pins a FINGERPRINT of its generator's output next to its VERSION: TFDS
keeps prepared data under data_dir/name/config/version and serves it as long as that folder
exists, so a generator change that kept the version would keep serving the old data.
`fingerprint(builder)` hashes the first examples of each split of every named config,
generated in memory, and tests/test_datasets.py fails until the pinned value is updated
along with a new VERSION.

A task row is next-token prediction with weights: `targets[t]` is what the model must predict
after reading `inputs[:t + 1]`, and only positions with `weights[t] > 0` are trained on and
scored (MQAR's queries, ListOps' answer). A classification row (a config whose
`num_classes()` is > 0) is a task row with its label at position 0 (weight 1 there only) and
`segment_ids` [L] marking its real tokens (1; 0 on padding): the model pools the row and
predicts the label (LRA's protocol). A sequence-to-sequence row (`is_seq2seq()`) is a
source `inputs` [L] with its `segment_ids` and a translation `targets` [L] weighted where it
has tokens, for an encoder-decoder. Each example is drawn from its own random stream,
`numpy.random.default_rng([seed, split, index])`, so a dataset is the same on every machine and
in any generation order, and train and test come from disjoint seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "test")  # test: the held-out split, drawn from its own seeds
FILE_FORMAT = "array_record"  # random access without TensorFlow (tfds.data_source, grain)
FINGERPRINT_EXAMPLES = 3  # examples per split and config that the fingerprint hashes


class ProjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder of the project: array_record files, a checked config, a pinned FINGERPRINT
    of `sample()` (recomputed by `fingerprint`)."""

    FINGERPRINT: ClassVar[str] = ""  # fingerprint(cls) at VERSION; a subclass pins it

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", FILE_FORMAT)  # TFDS's own default is tfrecord
        super().__init__(**kwargs)
        self.builder_config.check()

    @classmethod
    def sample(cls) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, example) pairs that show what the generator makes, generated in memory: the
        first examples of each split of every named config, and the configs' fields."""
        raise NotImplementedError


def config_fields(config: tfds.core.BuilderConfig, exclude: tuple[str, ...] = ()) -> dict:
    """A config's own fields (those TFDS's BuilderConfig does not define), less `exclude`."""
    common = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)} | set(exclude)
    fields = dataclasses.fields(config)
    return {f.name: getattr(config, f.name) for f in fields if f.name not in common}


def fingerprint(builder: type[ProjectBuilder]) -> str:
    """The first 16 hex digits of the SHA-256 of `builder.sample()`: keys, feature names, and
    arrays' dtypes, shapes and bytes (other values by repr)."""
    digest = hashlib.sha256()
    for key, example in builder.sample():
        digest.update(f"\n{key}".encode())
        for name in sorted(example):
            value = example[name]
            if isinstance(value, np.ndarray):
                digest.update(f"|{name}:{value.dtype.str}{value.shape}=".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            else:
                digest.update(f"|{name}={value!r}".encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class TaskConfig(tfds.core.BuilderConfig):
    """Sizes shared by the synthetic tasks; a subclass adds the task's own fields and checks."""

    seq_len: int = 128  # L: tokens per row
    num_train: int = 1000  # examples in the train split
    num_test: int = 200  # examples in the test split
    seed: int = 0  # the dataset's seed (examples use [seed, split, index])

    def check(self) -> None:
        """Raises ValueError naming the fields of a config that cannot be built."""
        for name in ("seq_len", "num_train", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def vocab_size(self) -> int:
        raise NotImplementedError

    def max_targets(self) -> int:
        """The most weighted positions in a row (the trainer computes logits only there)."""
        raise NotImplementedError

    def num_classes(self) -> int:
        """> 0: rows are classification rows of that many classes (module docstring)."""
        return 0

    def is_seq2seq(self) -> bool:
        """Whether rows are a source and its translation (module docstring)."""
        return False

    def end_token(self) -> int | None:
        """The token that ends a translation (seq2seq rows), after which a decoder is done."""
        return None


def classification_row(inputs: np.ndarray, length: int, label: int) -> dict[str, np.ndarray]:
    """A classification row: `inputs` whose first `length` tokens are real, and their label."""
    row = task_row(inputs, 0, label)
    row["segment_ids"] = (np.arange(len(inputs)) < length).astype(np.int32)
    return row


def task_row(inputs: np.ndarray, at: Any, answers: Any) -> dict[str, np.ndarray]:
    """A task row: `inputs`, and `answers` as the targets at positions `at`, weighted 1 there
    and 0 elsewhere."""
    targets = np.zeros(len(inputs), np.int32)
    targets[at] = answers
    weights = np.zeros(len(inputs), np.float32)
    weights[at] = 1.0
    return {"inputs": np.asarray(inputs, np.int32), "targets": targets, "weights": weights}


class TaskBuilder(ProjectBuilder, skip_registration=True):
    """A TFDS builder of fixed-length task rows; a subclass defines `example(config, rng)`."""

    @staticmethod
    def example(config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def examples(cls, config: TaskConfig, split: str) -> Iterator[tuple[int, dict]]:
        """The (index, example) pairs of a split, each from [seed, split, index]."""
        count = {"train": config.num_train, "test": config.num_test}[split]
        for index in range(count):
            rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
            yield index, cls.example(config, rng)

    @classmethod
    def sample(cls) -> Iterator[tuple[str, dict[str, Any]]]:
        for config in cls.BUILDER_CONFIGS:
            yield config.name, config_fields(config)
            for split in SPLITS:
                first = itertools.islice(cls.examples(config, split), FINGERPRINT_EXAMPLES)
                for index, row in first:
                    yield f"{config.name}/{split}/{index}", row

    def _info(self) -> tfds.core.DatasetInfo:
        L = self.builder_config.seq_len
        features = {
            "inputs": tfds.features.Tensor(shape=(L,), dtype=np.int32),
            "targets": tfds.features.Tensor(shape=(L,), dtype=np.int32),
            "weights": tfds.features.Tensor(shape=(L,), dtype=np.float32),
        }
        if self.builder_config.num_classes() or self.builder_config.is_seq2seq():
            features["segment_ids"] = tfds.features.Tensor(shape=(L,), dtype=np.int32)
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        return self.examples(self.builder_config, split)
