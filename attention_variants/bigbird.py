"""`bigbird`: block-sparse attention with window, global and random blocks (Zaheer et al. 2020).

Positions (within the document) fall in blocks of `block`. Query block a sees key block b when
  * b is in its window, a - left <= b <= a + right, `window=(left, right)` in blocks (default
    (1, 1): the paper's 3-block window, which causal attention clips to the query's block and
    the one before; an int w means (w - 1, 0));
  * a or b is among the first `num_global` blocks (global blocks see and are seen by all);
  * b is one of `num_random` blocks that row a draws, among the blocks of its document that it
    does not already see: those with the smallest seeded priorities (numpy, seeded by
    (`seed`, a)). Causal draws come from blocks b <= a, so extending a document keeps the
    pattern of its prefix; non-causal draws depend on the document's length;
and `causal=True` adds j <= i element by element. Unpacked, tiles are the blocks and only the
visible ones run: O(T * block * (window + num_global + num_random)), linear in T. In packed rows
the causal band of tiles runs with the pattern applied per element, document by document.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attention_variants.families import MaskedSoftmax
from attention_variants.masks import (
    BlockTable,
    _lookup,
    block_pairs,
    check_int,
    visible_pairs,
    window_extent,
)
from attention_variants.registry import register, spec

BLOCK, WINDOW, GLOBAL, RANDOM = 64, (1, 1), 2, 3  # the paper's ITC setting (block 64, 3/2/3 blocks)
NEVER = -1  # threshold of a block that is never a random draw


@functools.lru_cache(maxsize=32)
def random_thresholds(n, left, right, num_global, num_random, seed, causal) -> np.ndarray:
    """int32 [n, n]: b is row a's random draw in a document of m key blocks iff b < m <= N[a, b].

    Row a's candidates are the blocks it does not already see (window, global; b <= a when
    causal). It draws the `num_random` candidates of smallest priority among those below m, so
    candidate b is drawn while fewer than num_random candidates of smaller priority lie below m:
    N[a, b] is the num_random-th smallest index among them (n when there are fewer).
    Priorities of row a are default_rng((seed, a)).random(n), whose prefix does not depend on n.
    """
    a, b = np.arange(n)[:, None], np.arange(n)[None, :]
    seen = ((b >= a - left) & (b <= a + right)) | (a < num_global) | (b < num_global)
    candidate = ~seen & ((b <= a) if causal else True)
    prio = np.stack([np.random.default_rng((seed, row)).random(n) for row in range(n)])
    prio = np.where(candidate, prio, np.inf)
    order = np.argsort(prio, axis=1, kind="stable")  # candidates first, by priority
    index = np.where(np.take_along_axis(candidate, order, 1), order, n)  # n: not a candidate
    top = np.full((n, max(num_random, 1)), n)  # per row: smallest indices seen so far, sorted
    thresholds = np.full((n, n), NEVER, np.int64)
    for t in range(n if num_random else 0):
        cols = order[:, t]
        threshold = np.where(index[:, t] < n, top[:, num_random - 1], NEVER)
        thresholds[np.arange(n), cols] = threshold
        top = np.sort(np.concatenate([top, index[:, t : t + 1]], 1), axis=1)[:, :num_random]
    return thresholds.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BigBird(BlockTable):
    """The BigBird pattern; `sized(positions, keys)` fixes the table sizes for one call."""

    block: int = BLOCK
    window: tuple[int, int] = WINDOW
    num_global: int = GLOBAL
    num_random: int = RANDOM
    seed: int = 0
    causal: bool = True
    q_blocks: int = 1  # table rows: blocks of positions (set by `sized`)
    k_blocks: int = 1  # key blocks of an unpacked row (set by `sized`)

    def __post_init__(self):
        check_int("block", self.block)
        object.__setattr__(self, "window", window_extent("window", self.window))
        check_int("num_global", self.num_global, 0)
        check_int("num_random", self.num_random, 0)
        check_int("seed", self.seed, 0)

    @property
    def reach(self):
        return None, (0 if self.causal else None)

    def sized(self, positions: int, keys: int) -> BigBird:
        blocks = lambda n: -(-n // self.block)  # noqa: E731
        return dataclasses.replace(self, q_blocks=blocks(positions), k_blocks=blocks(keys))

    @functools.cached_property
    def thresholds(self) -> np.ndarray:
        n = max(self.q_blocks, self.k_blocks)
        opts = (*self.window, self.num_global, self.num_random, self.seed, self.causal)
        return random_thresholds(n, *opts)

    def visible(self, q_pos, k_pos, doc_len=None):
        a, b = q_pos // self.block, k_pos // self.block
        left, right = self.window
        vis = ((b >= a - left) & (b <= a + right)) | (a < self.num_global) | (b < self.num_global)
        m = self.k_blocks if doc_len is None else -(-doc_len // self.block)
        vis = vis | ((b < m) & (m <= _lookup(self.thresholds, a, b)))
        return vis & (k_pos <= q_pos) if self.causal else vis

    @functools.cached_property
    def table(self) -> np.ndarray:
        """bool [q_blocks, k_blocks]: the blocks an unpacked row sees (for the tile schedule)."""
        a = np.arange(self.q_blocks)[:, None] * self.block
        b = np.arange(self.k_blocks)[None, :] * self.block
        table = self.visible(a + self.block - 1, b)  # the block's last query sees the most
        return np.tril(table) if self.causal else table

    def pairs(self, T, S):
        sized = self.sized(T, S)
        if self.causal and T != S:
            return visible_pairs(sized, T, S)
        return block_pairs(sized.table, self.block, T, S, self.causal)

    def preferred_tiles(self, segmented):
        return None if segmented else (self.block, self.block)


@register(
    "bigbird",
    family=MaskedSoftmax(tiles="auto"),
    long_context=True,
    test_options=(
        {"block": 4, "window": 4, "num_global": 1, "num_random": 2},
        {"block": 8, "window": (1, 1), "num_global": 2, "num_random": 1, "seed": 3},
        {"block": 16, "window": 1, "num_global": 1, "num_random": 1},
        {"block": 2, "window": (2, 3), "num_global": 3, "num_random": 3, "seed": 7},
    ),
)
def bigbird(
    *,
    causal: bool,
    block=BLOCK,
    window=WINDOW,
    num_global=GLOBAL,
    num_random=RANDOM,
    seed=0,
) -> BigBird:
    """BigBird's mask; tiles default to the blocks (unpacked)."""
    return BigBird(block, window, num_global, num_random, seed, causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised BigBird mask.
reference = spec("bigbird").reference
