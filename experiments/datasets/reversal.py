"""A synthetic translation for the encoder-decoder: the source reversed, in another alphabet.

A source sentence is n words (n from min_len to max_len) drawn uniformly from a source
alphabet of `alphabet` words; its translation writes the words in reverse order, each through
a fixed random bijection onto a target alphabet of the same size, then an end token. So each
target word is determined by one source word at a position that moves with the output (an
alignment the decoder must find through cross-attention), and the target's length by the
source's. Ids: 0 is padding (and the decoder's start token), 1 the end token, the source words
2 .. alphabet + 1, the target words alphabet + 2 .. 2 * alphabet + 1 (one shared vocabulary).

A row: `inputs` [L] the source (0-padded), `segment_ids` [L] 1 on its words and 0 on padding,
`targets` [L] the translation and the end token (0-padded), `weights` [L] 1 on those.

    import experiments.datasets  # registers the builders
    tfds.data_source("reversal/short", data_dir=D)["train"][0]
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.base import TaskBuilder, TaskConfig

END = 1  # the end token; 0 is padding and the decoder's start token
FIRST_WORD = 2  # the source alphabet's first id


@dataclasses.dataclass
class ReversalConfig(TaskConfig):
    """Sentences of min_len..max_len words from an alphabet of `alphabet` words; rows of L."""

    min_len: int = 4  # fewest source words
    max_len: int = 12  # most source words (< seq_len: the end token follows the translation)
    alphabet: int = 16  # words in each alphabet
    mapping_seed: int = 0  # seeds the bijection from the source alphabet to the target's

    def check(self) -> None:
        super().check()
        if not 1 <= self.min_len <= self.max_len < self.seq_len:
            raise ValueError(
                f"need 1 <= min_len <= max_len < seq_len, got min_len={self.min_len}, "
                f"max_len={self.max_len}, seq_len={self.seq_len}"
            )
        if self.alphabet < 2:
            raise ValueError(f"alphabet={self.alphabet} must be >= 2")

    def vocab_size(self) -> int:
        return FIRST_WORD + 2 * self.alphabet

    def max_targets(self) -> int:
        return self.max_len + 1  # the words and the end token

    def is_seq2seq(self) -> bool:
        return True

    def end_token(self) -> int:
        return END

    def translation(self) -> np.ndarray:
        """The bijection: int [vocab_size], source word id -> target word id (others 0)."""
        order = np.random.default_rng([self.mapping_seed, 7]).permutation(self.alphabet)
        table = np.zeros(self.vocab_size(), np.int32)
        table[FIRST_WORD : FIRST_WORD + self.alphabet] = FIRST_WORD + self.alphabet + order
        return table


def reversal_example(config: ReversalConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row drawn from `rng` (see the module docstring)."""
    n = int(rng.integers(config.min_len, config.max_len + 1))
    words = FIRST_WORD + rng.integers(config.alphabet, size=n)
    L = config.seq_len
    inputs, segment_ids = np.zeros(L, np.int32), np.zeros(L, np.int32)
    inputs[:n], segment_ids[:n] = words, 1
    targets, weights = np.zeros(L, np.int32), np.zeros(L, np.float32)
    targets[:n], targets[n] = config.translation()[words[::-1]], END
    weights[: n + 1] = 1.0
    return {"inputs": inputs, "segment_ids": segment_ids, "targets": targets, "weights": weights}


class Reversal(TaskBuilder):
    """Source and translation rows: `small` for tests, `short` learns on a CPU in a minute,
    `long` has sentences of up to 60 words."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FINGERPRINT = "97a23e3dd5e06dde"  # base.fingerprint at VERSION
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        ReversalConfig(name="small", seq_len=16, min_len=4, max_len=12, num_train=1000),
        ReversalConfig(name="short", seq_len=16, min_len=4, max_len=12, num_train=20000),
        ReversalConfig(name="long", seq_len=64, min_len=16, max_len=60, num_train=50000),
    ]
    example = staticmethod(reversal_example)
