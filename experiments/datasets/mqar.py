"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Section 3).

A row of length L opens with N key-value pairs k1 v1 ... kN vN, keys drawn without replacement
from [1, V/2) and values from [V/2, V). Every key is then queried exactly once: key i is placed
at position 2N + 2 g_i, where the gaps g_i are distinct and drawn from {0, ..., L/2 - N - 1}
with probability proportional to (g + 1)^(a - 1), a = 0.01 (most queries come soon after the
pairs, a few far away). Every other position holds 0. At a query the model must predict the
value that followed that key: `targets` holds it there and `weights` is 1 at the N queries only.
This follows Zoology's generator (`zoology/data/multiquery_ar.py`) with zero filler: Zoology
fills the other positions with random tokens by default (`random_non_queries`), which makes
the queries harder to spot; here they are the only non-zero tokens after the pairs.

    import experiments.datasets  # registers the builders
    tfds.builder("mqar/small", data_dir=D).download_and_prepare()
    tfds.data_source("mqar/small", data_dir=D)["train"][0]  # {"inputs", "targets", "weights"}
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.base import TaskBuilder, TaskConfig, task_row

POWER_A = 0.01  # a: the gap distribution's power law (Zoology's default)


@dataclasses.dataclass
class MqarConfig(TaskConfig):
    """An MQAR setting: vocabulary V, length L, N key-value pairs (V > L, 4N <= L)."""

    vocab: int = 8192  # V
    num_pairs: int = 8  # N

    def check(self) -> None:
        super().check()
        L, V, N = self.seq_len, self.vocab, self.num_pairs
        if N < 1:
            raise ValueError(f"num_pairs={N} must be >= 1")
        if 4 * N > L:
            raise ValueError(f"4 * num_pairs = {4 * N} > seq_len = {L}: the queries do not fit")
        if V <= L:
            raise ValueError(f"vocab={V} must be > seq_len={L} (Zoology's setting)")
        if L % 2:
            raise ValueError(f"seq_len={L} must be even (queries sit at even offsets)")

    def vocab_size(self) -> int:
        return self.vocab

    def max_targets(self) -> int:
        return self.num_pairs  # the queries


def mqar_example(config: MqarConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One MQAR row drawn from `rng` (see the module docstring)."""
    L, V, N = config.seq_len, config.vocab, config.num_pairs
    keys = rng.choice(np.arange(1, V // 2), N, replace=False)
    values = rng.choice(np.arange(V // 2, V), N, replace=False)
    space = L // 2 - N  # query slots after the 2N pair tokens, every other position
    p = (np.arange(space) + 1.0) ** (POWER_A - 1)
    gaps = rng.choice(space, N, replace=False, p=p / p.sum())
    inputs = np.zeros(L, np.int32)
    inputs[0 : 2 * N : 2], inputs[1 : 2 * N : 2] = keys, values
    queries = 2 * N + 2 * gaps
    inputs[queries] = keys
    return task_row(inputs, queries, values)


class Mqar(TaskBuilder):
    """MQAR rows; configs name a setting, `MqarConfig(...)` makes any other."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FINGERPRINT = "37492a79f204d2b7"  # base.fingerprint at VERSION
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        MqarConfig(name="small", seq_len=64, vocab=128, num_pairs=4, num_train=256, num_test=64),
        MqarConfig(
            name="zoology", seq_len=128, vocab=8192, num_pairs=8, num_train=20000, num_test=1000
        ),
    ]
    example = staticmethod(mqar_example)
