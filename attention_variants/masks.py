"""Visibility predicates on (query position, key position), evaluated per tile.

A mask answers two questions:
  * `visible(q_pos, k_pos)`: which keys each query sees, on broadcastable position arrays
    (numpy or jax). Fast kernels evaluate it on one [tq, tk] tile at a time.
  * `tile_visible(q_lo, q_hi, k_lo, k_hi)`: whether any query in [q_lo, q_hi] sees any key in
    [k_lo, k_hi] (inclusive bounds, numpy arrays). Kernels build their static tile schedule
    from it, so tiles that nobody sees are never computed.
  * `tile_full(q_lo, q_hi, k_lo, k_hi)`: whether every query there sees every key there; such
    tiles skip the mask. The default answers False (always mask), which is always correct.
`dense(T, S)` materialises the [T, S] boolean mask: for references and tests only.
Tile bounds may be arrays of any broadcastable shapes; both tile answers may be conservative
(`tile_visible` may say True, `tile_full` False, when unsure) but never the other way round.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """Raises ValueError naming `name` unless `value` is an int in [minimum, maximum]."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bounds}, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base class: every key is visible (non-causal, unmasked attention)."""

    def visible(self, q_pos, k_pos):
        return (q_pos >= 0) | (k_pos >= 0)  # all True, with the broadcast shape

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        return np.ones(np.broadcast(q_lo, k_lo).shape, bool)

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return self.tile_visible(q_lo, q_hi, k_lo, k_hi) if type(self) is Mask else False

    def dense(self, T: int, S: int) -> np.ndarray:
        return np.asarray(self.visible(np.arange(T)[:, None], np.arange(S)[None, :]))


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query i sees key j iff j <= i."""

    def visible(self, q_pos, k_pos):
        return k_pos <= q_pos

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        return k_lo <= q_hi

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return k_hi <= q_lo


@dataclasses.dataclass(frozen=True)
class Window(Mask):
    """Sliding window: query i sees key j iff i - window < j <= i (`window` keys, itself too).

    With `causal=False` the window is symmetric: |i - j| < window.
    """

    window: int
    causal: bool = True

    def __post_init__(self):
        check_int("window", self.window)

    def visible(self, q_pos, k_pos):
        near = k_pos > q_pos - self.window
        if self.causal:
            return near & (k_pos <= q_pos)
        return near & (k_pos < q_pos + self.window)

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        near = k_hi > q_lo - self.window
        if self.causal:
            return near & (k_lo <= q_hi)
        return near & (k_lo < q_hi + self.window)

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        near = k_lo > q_hi - self.window
        if self.causal:
            return near & (k_hi <= q_lo)
        return near & (k_hi < q_lo + self.window)


@dataclasses.dataclass(frozen=True)
class Fixed(Mask):
    """Sparse Transformer "fixed" pattern (Child et al. 2019), blocks of `block` positions.

    Query i sees key j iff j is in i's block or among the last `summary` positions of any
    block, and j <= i. With `causal=False` the same without j <= i: the whole own block plus
    the summary positions of every block (the paper's bidirectional form).
    """

    block: int
    summary: int
    causal: bool = True

    def __post_init__(self):
        check_int("block", self.block)
        check_int("summary", self.summary, 0, self.block)

    def _summary(self, k_pos):
        return k_pos % self.block >= self.block - self.summary

    def visible(self, q_pos, k_pos):
        vis = (q_pos // self.block == k_pos // self.block) | self._summary(k_pos)
        return vis & (k_pos <= q_pos) if self.causal else vis

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        b = self.block
        causal = (k_lo <= q_hi) if self.causal else True
        shared_block = np.maximum(q_lo // b, k_lo // b) <= np.minimum(q_hi // b, k_hi // b)
        # The first summary position at or after k_lo must lie in the tile (and be <= q_hi).
        first = np.where(self._summary(k_lo), k_lo, k_lo - k_lo % b + b - self.summary)
        summary = (self.summary > 0) & (first <= k_hi)
        if self.causal:
            summary = summary & (first <= q_hi)
        return (shared_block & causal) | summary

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        b = self.block
        all_summary = (self.summary == b) | ((k_lo // b == k_hi // b) & self._summary(k_lo))
        one_block = (q_lo // b == q_hi // b) & (q_lo // b == k_lo // b) & (k_lo // b == k_hi // b)
        full = all_summary | one_block  # conservative: a block plus earlier summaries says no
        return full & (k_hi <= q_lo) if self.causal else full


def _uses_jax(*xs) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


@dataclasses.dataclass(frozen=True)
class BlockSparse(Mask):
    """Block-level pattern: query i sees key j iff table[i // block, j // block] (and j <= i).

    The bool table [query blocks, key blocks] is stored as bytes so the mask stays hashable
    (a static argument of the tile schedule); it is looked up by block index, never expanded
    to [T, S] outside `dense`. Build it with `BlockSparse.of(table, block, causal)`.
    """

    block: int
    shape: tuple[int, int]
    table_bytes: bytes = dataclasses.field(repr=False)
    causal: bool = True

    @classmethod
    def of(cls, table: np.ndarray, block: int, causal: bool = True) -> BlockSparse:
        table = np.asarray(table, bool)
        return cls(block, table.shape, table.tobytes(), causal)

    def __post_init__(self):
        check_int("block", self.block)
        if len(self.table_bytes) != self.shape[0] * self.shape[1]:
            raise ValueError(f"table of {len(self.table_bytes)} bytes is not {self.shape}")

    @functools.cached_property
    def table(self) -> np.ndarray:
        """bool [query blocks, key blocks]; with causal, blocks above the diagonal dropped."""
        table = np.frombuffer(self.table_bytes, bool).reshape(self.shape)
        return np.tril(table) if self.causal else table

    @functools.cached_property
    def _counts(self) -> np.ndarray:
        """Summed-area table: _counts[a, c] = visible blocks in table[:a, :c]."""
        return np.pad(self.table.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def visible(self, q_pos, k_pos):
        qb, kb = q_pos // self.block, k_pos // self.block
        if _uses_jax(q_pos, k_pos):  # a tile inside a kernel (padding clamps to the last block)
            vis = jnp.asarray(self.table)[qb, kb]
        else:
            vis = self.table[qb, kb]
        return vis & (k_pos <= q_pos) if self.causal else vis

    def _blocks(self, q_lo, q_hi, k_lo, k_hi):
        """Visible blocks and all blocks among those the tile touches."""
        ql, qh, kl, kh = (x // self.block for x in (q_lo, q_hi, k_lo, k_hi))
        c = self._counts
        seen = c[qh + 1, kh + 1] - c[ql, kh + 1] - c[qh + 1, kl] + c[ql, kl]
        return seen, (qh - ql + 1) * (kh - kl + 1)

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        seen, _ = self._blocks(q_lo, q_hi, k_lo, k_hi)
        return (seen > 0) & (k_lo <= q_hi) if self.causal else seen > 0

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        seen, area = self._blocks(q_lo, q_hi, k_lo, k_hi)
        return (seen == area) & (k_hi <= q_lo) if self.causal else seen == area


def causal_or_full(causal: bool) -> Mask:
    return Causal() if causal else Mask()
