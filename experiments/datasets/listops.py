"""ListOps (Nangia & Bowman 2018), as generated for the Long Range Arena (Tay et al. 2020).

A row is a nested list expression over the digits 0-9 with the operators MIN, MAX, MED
(median) and SM (sum modulo 10), e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9, tokenised as in LRA:
`[MAX` opens an operator, `]` closes it, a digit is a token. Trees are drawn as LRA's generator
draws them: from depth 1, a node is a leaf digit with probability 0.75 (always at
`max_depth`), else an operator over 2-`max_args` random subtrees; trees whose token count is
outside [min_len, max_len] are drawn again. Differences from LRA's files: `max_args` is 9 here
(LRA's generator: 10), the length bounds are inclusive (LRA: strict), and examples are not
de-duplicated across splits (LRA: a set), so a short expression can occur in both. The answer
is the expression's value. In the default form, classifying it is next-token prediction at
the last token of the expression (`targets` holds the answer digit there, `weights` is 1 there
only); rows are padded with 0 to `seq_len`. With `classification` (configs `classify-*`) it is
LRA's protocol: a classification row (base.py) of 10 classes, the answer as the label, read by
an encoder that pools the whole expression.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.base import TaskBuilder, TaskConfig, classification_row, task_row

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
TOKENS = ("<pad>", *(str(d) for d in range(10)), *OPERATORS, CLOSE)  # id = index
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
LEAF_PROBABILITY = 0.75


@dataclasses.dataclass
class ListOpsConfig(TaskConfig):
    """A ListOps setting: expressions of min_len..max_len tokens, padded to seq_len."""

    min_len: int = 20  # fewest tokens of an expression
    max_len: int = 100  # most tokens of an expression (<= seq_len)
    max_depth: int = 10  # nesting depth at which every node is a leaf
    max_args: int = 9  # most arguments of an operator (fewest: 2)
    classification: bool = False  # LRA's form: the answer is the row's label (module docstring)

    def check(self) -> None:
        super().check()
        if not 1 <= self.min_len <= self.max_len <= self.seq_len:
            raise ValueError(
                f"need 1 <= min_len <= max_len <= seq_len, got min_len={self.min_len}, "
                f"max_len={self.max_len}, seq_len={self.seq_len}"
            )
        if self.max_args < 2 or self.max_depth < 1:
            raise ValueError(f"max_args={self.max_args} must be >= 2, max_depth >= 1")

    def vocab_size(self) -> int:
        return len(TOKENS)

    def max_targets(self) -> int:
        return 1  # the answer

    def num_classes(self) -> int:
        return 10 if self.classification else 0


def draw_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int) -> Any:
    """A digit (leaf) or (operator, [subtrees]), drawn as LRA's generator draws it."""
    if depth >= max_depth or rng.random() < LEAF_PROBABILITY:
        return int(rng.integers(10))
    count = int(rng.integers(2, max_args + 1))
    operator = OPERATORS[int(rng.integers(len(OPERATORS)))]
    return operator, [draw_tree(rng, depth + 1, max_depth, max_args) for _ in range(count)]


def tokens(tree: Any) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    operator, args = tree
    return [operator, *(t for arg in args for t in tokens(arg)), CLOSE]


def value(tree: Any) -> int:
    if isinstance(tree, int):
        return tree
    operator, args = tree
    values = sorted(value(arg) for arg in args)
    if operator == "[MIN":
        return values[0]
    if operator == "[MAX":
        return values[-1]
    if operator == "[MED":
        return int(np.median(values))  # LRA: numpy's median, truncated to an int
    return sum(values) % 10


def listops_example(config: ListOpsConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One padded ListOps row drawn from `rng` (see the module docstring)."""
    while True:
        tree = draw_tree(rng, 1, config.max_depth, config.max_args)
        seq = tokens(tree)
        if config.min_len <= len(seq) <= config.max_len:
            break
    inputs = np.zeros(config.seq_len, np.int32)
    inputs[: len(seq)] = [TOKEN_ID[t] for t in seq]
    if config.classification:
        return classification_row(inputs, len(seq), value(tree))
    return task_row(inputs, len(seq) - 1, TOKEN_ID[str(value(tree))])


class Listops(TaskBuilder):
    """ListOps rows; `short` trains on a CPU in minutes, `lra` is the paper's setting; the
    `classify-*` configs are the same in LRA's classification form."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release.",
        "1.1.0": "The classification form (configs classify-*); the others unchanged.",
    }
    FINGERPRINT = "a72e5b94209a43ba"  # base.fingerprint at VERSION
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        ListOpsConfig(name="small", seq_len=64, min_len=8, max_len=64, num_train=256, num_test=64),
        ListOpsConfig(name="short", seq_len=128, min_len=20, max_len=128, num_train=20000),
        ListOpsConfig(
            name="lra", seq_len=2048, min_len=500, max_len=2000, num_train=96000, num_test=2000
        ),
    ]
    BUILDER_CONFIGS += [  # noqa: RUF012
        dataclasses.replace(c, name=f"classify-{c.name}", classification=True)
        for c in BUILDER_CONFIGS
    ]
    example = staticmethod(listops_example)
