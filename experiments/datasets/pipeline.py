"""The input pipeline (grain): shuffled, repeated, batched rows of `inputs`, `targets`,
`weights` [B, L] for training, one ordered pass for evaluation; text documents are packed.

Task datasets (mqar, listops) already have fixed-length rows. A text dataset (a `text` feature
of bytes per document) becomes next-token rows: each document gives inputs = text[:-1],
targets = text[1:], weights = 1, and grain's concat-then-split packer fills rows of L tokens
with the documents in order, cutting each one that crosses a row boundary (its rest opens the
next row), and adds `segment_ids` (1, 2, ... per document piece in the row, 0 on padding) so
that no token attends across documents and positions restart per piece (the model derives
them from the ids). Training rows are then shuffled again in windows. Training iterators are grain
`DatasetIterator`s: `get_state()` / `set_state()` (or orbax, via `grain.checkpoint`) resume
them exactly.

`eval_subset` picks a text evaluation set by a token budget spread over many documents, so
that no single long file decides the score.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

FEATURES = ("inputs", "targets", "weights")


def is_text(source: Sequence[dict[str, Any]]) -> bool:
    return "text" in source[0]


def _document(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """A text document as next-token features (one position shorter than the text)."""
    text = np.asarray(example["text"], np.int32)
    return {"inputs": text[:-1], "targets": text[1:], "weights": np.ones(len(text) - 1, np.float32)}


def _row(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """A task row's features (and its segment_ids, where it has them: classification)."""
    return {f: np.asarray(example[f]) for f in (*FEATURES, "segment_ids") if f in example}


def _packed(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """The packer's output as a model row: one `segment_ids`, zero weight on padding."""
    row = {f: example[f] for f in FEATURES}
    row["segment_ids"] = example["inputs_segment_ids"].astype(np.int32)
    row["weights"] = np.where(row["segment_ids"] > 0, row["weights"], 0.0).astype(np.float32)
    return row


def _rows(dataset: grain.MapDataset, text: bool, seq_len: int | None) -> grain.IterDataset:
    if not text:
        return dataset.map(_row).to_iter_dataset()
    if seq_len is None:
        raise ValueError("a text dataset needs seq_len: its documents are packed into rows")
    documents = dataset.map(_document).to_iter_dataset()
    lengths = dict.fromkeys(FEATURES, seq_len)
    packed = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct=lengths)
    return packed.map(_packed)


SHUFFLE_WINDOW = 256  # packed text rows are shuffled again in windows of this many rows


def train_batches(
    source: Sequence[dict[str, Any]], *, batch_size: int, seed: int, seq_len: int | None = None
) -> grain.DatasetIterator:
    """An endless iterator of training batches: shuffled with `seed`, reshuffled each epoch;
    packed text rows are shuffled again in windows, so that the consecutive rows of one long
    document do not fill whole batches."""
    dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    rows = _rows(dataset, is_text(source), seq_len)
    if is_text(source):
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=SHUFFLE_WINDOW, seed=seed
        )
    return iter(rows.batch(batch_size, drop_remainder=True))


def eval_batches(
    source: Sequence[dict[str, Any]], *, batch_size: int, seq_len: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `source` in order; the last batch may be smaller."""
    rows = _rows(grain.MapDataset.source(source), is_text(source), seq_len)
    return iter(rows.batch(batch_size, drop_remainder=False))


PER_DOCUMENT = 1024  # eval_subset: most scored tokens from one document


def eval_subset(
    source: Sequence[dict[str, Any]],
    max_tokens: int,
    seed: int = 0,
    per_document: int = PER_DOCUMENT,
) -> list[dict[str, Any]]:
    """`max_tokens` scored tokens of text (fewer if `source` has fewer) from many documents of
    `source`, the same for the same seed: the documents in a seeded random order, from each a
    window of at most `per_document` scored tokens (`per_document + 1` bytes: each byte
    predicts the next) at a seeded random offset, a whole document when it is shorter, until
    the budget is spent (the last window cut to fit). So the evaluated tokens come from at
    least `max_tokens / per_document` documents (or from all of them), spread over each
    document, not only its opening lines. Returns the windows as documents (`text` replaced)."""
    if max_tokens < 1 or per_document < 1:
        raise ValueError(f"max_tokens={max_tokens} and per_document={per_document} must be >= 1")
    rng = np.random.default_rng(seed)
    subset, left = [], max_tokens
    for index in rng.permutation(len(source)):
        if left == 0:
            break
        example = source[int(index)]
        text = np.asarray(example["text"])
        size = min(len(text), per_document + 1, left + 1)  # bytes: size - 1 scored tokens
        if size < 2:
            continue
        start = int(rng.integers(len(text) - size + 1))
        subset.append({**example, "text": text[start : start + size]})
        left -= size - 1
    return subset
