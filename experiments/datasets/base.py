"""What the synthetic task builders share: fixed-length `inputs`, `targets`, `weights` rows.

A task row is next-token prediction with weights: `targets[t]` is what the model must predict
after reading `inputs[:t + 1]`, and only positions with `weights[t] > 0` are trained on and
scored (MQAR's queries, ListOps' answer). Each example is drawn from its own random stream,
`numpy.random.default_rng([seed, split, index])`, so a dataset is the same on every machine and
in any generation order, and train and test come from disjoint seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

SPLITS = ("train", "test")  # test: the held-out split, drawn from its own seeds


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


class TaskBuilder(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder of fixed-length task rows; a subclass defines `example(config, rng)`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.builder_config.check()

    @staticmethod
    def example(config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        L = self.builder_config.seq_len
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(L,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(L,), dtype=np.int32),
                    "weights": tfds.features.Tensor(shape=(L,), dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        config = self.builder_config
        sizes = {"train": config.num_train, "test": config.num_test}
        return {split: self._generate_examples(split, sizes[split]) for split in SPLITS}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        for index in range(count):
            rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
            yield index, self.example(config, rng)
