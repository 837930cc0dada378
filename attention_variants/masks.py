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
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
        if not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"window must be a positive int, got window={self.window!r}")

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


def causal_or_full(causal: bool) -> Mask:
    return Causal() if causal else Mask()
