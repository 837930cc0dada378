"""Passkey retrieval, a needle in a haystack (Mohtashami & Jaggi 2023, "Landmark Attention").

The paper hides "The pass key is 71432. Remember it." in a long repetition of "The grass is
green. The sky is blue. The sun is yellow. Here we go. There and back again." and asks for
the key at the end. Here in token ids: a row of length L holds F = L - 2D - 2 filler tokens
with the needle, the marker NEEDLE followed by the key's D digits, inserted after the first
`round(depth * F)` of them (Python's round; `depth=None`: a uniform draw from 0..F per row,
so needles sit anywhere from the start to just before the query), then the marker QUERY and
the key's digits again. Next-token prediction answers: after QUERY the model must predict
the first digit, after each digit the next, so `targets` holds the D digits at the D
positions from QUERY on (L - D - 1 .. L - 2) and `weights` is 1 there only. The filler is the
paper's fixed sentence, `filler_vocab` tokens repeated in order from the row's start
(`filler="repeat"`), or uniform random filler tokens (`"random"`). The needle's position is
where NEEDLE stands in `inputs` (its depth is that position over F).

Token ids: 0 never occurs (the other tasks' padding), 1 NEEDLE ("the pass key is"), 2 QUERY
("what is the pass key?"), 3-12 the digits 0-9, then the filler tokens.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.base import TaskBuilder, TaskConfig, task_row

NEEDLE, QUERY, DIGIT, FILLER = 1, 2, 3, 13  # token ids: markers, digit 0, first filler
FILLERS = ("repeat", "random")


@dataclasses.dataclass
class PasskeyConfig(TaskConfig):
    """A passkey setting: rows of L tokens, a key of D digits at `depth` of the filler."""

    digits: int = 5  # D: digits of the key
    depth: float | None = None  # the needle's place in the filler, 0 (start) to 1; None: random
    filler: str = "repeat"  # "repeat": a fixed sentence over and over (the paper's); "random"
    filler_vocab: int = 16  # filler tokens (the repeated sentence's length)

    def check(self) -> None:
        super().check()
        L, D = self.seq_len, self.digits
        if D < 1:
            raise ValueError(f"digits={D} must be >= 1")
        if L < 2 * D + 2:
            raise ValueError(
                f"seq_len={L} < 2 * digits + 2 = {2 * D + 2}: no room for the needle "
                "(marker and key), the query marker and the answer"
            )
        if self.depth is not None and not 0 <= self.depth <= 1:
            raise ValueError(f"depth={self.depth} must be in [0, 1] or None")
        if self.filler not in FILLERS:
            raise ValueError(f"filler={self.filler!r} must be one of {FILLERS}")
        if self.filler_vocab < 1:
            raise ValueError(f"filler_vocab={self.filler_vocab} must be >= 1")

    def vocab_size(self) -> int:
        return FILLER + self.filler_vocab

    def max_targets(self) -> int:
        return self.digits  # the answer


def free_positions(config: PasskeyConfig) -> int:
    """F: the filler tokens of a row, the needle's possible starts less one."""
    return config.seq_len - 2 * config.digits - 2


def passkey_example(config: PasskeyConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One passkey row drawn from `rng` (see the module docstring)."""
    L, D, F = config.seq_len, config.digits, free_positions(config)
    key = DIGIT + rng.integers(10, size=D)
    at = int(rng.integers(F + 1)) if config.depth is None else round(config.depth * F)
    if config.filler == "repeat":
        haystack = FILLER + np.arange(F) % config.filler_vocab
    else:
        haystack = rng.integers(FILLER, FILLER + config.filler_vocab, F)
    parts = [haystack[:at], [NEEDLE], key, haystack[at:], [QUERY], key]
    inputs = np.concatenate(parts).astype(np.int32)
    answer = np.arange(L - D - 1, L - 1)  # from QUERY: each position predicts the next digit
    return task_row(inputs, answer, key)


class Passkey(TaskBuilder):
    """Passkey rows; `small` for tests, `short` trains on a CPU, `long` for longer contexts."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FINGERPRINT = "0acd9a743158a361"  # base.fingerprint at VERSION
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        PasskeyConfig(name="small", seq_len=64, num_train=256, num_test=64),
        PasskeyConfig(name="short", seq_len=256, num_train=20000, num_test=500),
        PasskeyConfig(name="long", seq_len=2048, num_train=5000, num_test=500),
    ]
    example = staticmethod(passkey_example)
