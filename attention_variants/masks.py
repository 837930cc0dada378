"""Visibility predicates on (query position, key position): what a masked-softmax variant declares.

Positions are *within the document*: with packed rows (segment ids) a position counts from the
start of its document, the same coordinates RoPE uses, so a packed document sees the pattern it
would see alone. Without segments they are absolute positions (queries at q_offset + i).

A mask answers, on broadcastable position arrays (numpy or jax):
  * `visible(q_pos, k_pos, doc_len=None)`: which keys each query sees. `doc_len` is the number
    of keys in the query's document, given with positions within documents (None: the row).
  * `reach`: (behind, ahead): key k is visible to query q only if q - behind <= k <= q + ahead
    (None: unbounded). It bounds the band of tiles worth computing, and holds in absolute
    positions too, since both positions of a pair shift by the same document start.
  * `tile_visible(q_lo, q_hi, k_lo, k_hi)`: whether any query in [q_lo, q_hi] sees any key in
    [k_lo, k_hi] (inclusive bounds, numpy arrays, absolute positions of an unpacked row).
  * `tile_full(...)`: whether every query there sees every key there (the tile skips the mask).
  * `sinks`, `band`: visible keys lie among the first `sinks` keys of the document or within
    `band` = (behind, ahead) of the query (default: 0 and `reach`). A decoding cache keeps only
    those (the first `sinks` keys and the last `behind`: StreamingLLM's sinks plus a window).
  * `preferred_tiles(segmented)`: the engine's tile sizes for the pattern (default: small
    tiles for a narrow band, the engine's defaults otherwise).
Both tile answers may be conservative (`tile_visible` True, `tile_full` False when unsure), never
the other way round. Masks combine: `a | b` shows what either shows, `a & b` what both show, with
tile answers, reach, sinks and tiles derived from the parts (`LogicalOr`, `LogicalAnd`).
A `shift_invariant` mask depends on k - q only, so its tile answers hold
within documents too; other masks run, in packed rows, the band of tiles `reach` allows and
apply `visible` per element. A subclass is taken to depend on positions (the safe answer) unless
it declares `shift_invariant = True`; the registry checks the claim on a grid (`check_shift`).
`dense(T, S)` materialises [T, S] for references and tests only.
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


def window_extent(name: str, window) -> tuple[int, int]:
    """`window` as (left, right): a pair as given, or an int W meaning (W - 1, 0), W keys back."""
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{name} must be an int W or a pair (left, right), got {window!r}")
        check_int(f"{name}[0] (left)", window[0], 0)
        check_int(f"{name}[1] (right)", window[1], 0)
        return int(window[0]), int(window[1])
    check_int(name, window)
    return int(window) - 1, 0


def everywhere(a, b):
    """All True with the broadcast shape of a and b (numpy or jax alike)."""
    return (a - a + b - b) == 0


GRID = 48  # positions on which a mask's claims are checked


def shifts_alike(mask: Mask, shifts=(1, 7, 29)) -> bool:
    """Whether `mask.visible` is the same pattern when queries and keys shift together by each
    of `shifts` (checked on a GRID x GRID block of an unpacked row)."""
    q, k = np.arange(GRID)[:, None], np.arange(GRID)[None, :]
    base = np.asarray(mask.visible(q, k))
    return all(np.array_equal(base, np.asarray(mask.visible(q + s, k + s))) for s in shifts)


@functools.lru_cache(maxsize=1024)
def check_shift(mask: Mask) -> Mask:
    """`mask`, after checking that a declared `shift_invariant` holds (ValueError naming the
    mask if not: packed rows would lay its tiles on the wrong positions)."""
    if mask.shift_invariant and not shifts_alike(mask):
        raise ValueError(
            f"{type(mask).__name__} declares shift_invariant = True, but its visible() changes "
            "when query and key positions shift together (checked on a grid): remove the claim "
            "(the default runs the pattern per document)"
        )
    return mask


def _band(q_lo, q_hi, k_lo, k_hi, reach):
    """Whether the tile meets the band q - behind <= k <= q + ahead (exact on a rectangle)."""
    behind, ahead = reach
    vis = everywhere(q_lo, k_lo)
    if ahead is not None:
        vis = vis & (k_lo <= q_hi + ahead)
    if behind is not None:
        vis = vis & (k_hi >= q_lo - behind)
    return vis


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base class: every key is visible (non-causal, unmasked attention)."""

    @property
    def shift_invariant(self) -> bool:
        """Whether visibility depends on k - q only. False unless a subclass declares it (a
        class attribute), so a pattern that forgets to say runs per document, never wrongly."""
        return type(self) is Mask

    @property
    def reach(self) -> tuple[int | None, int | None]:
        return None, None

    def visible(self, q_pos, k_pos, doc_len=None):
        return everywhere(q_pos, k_pos)

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        return _band(q_lo, q_hi, k_lo, k_hi, self.reach)

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return self.tile_visible(q_lo, q_hi, k_lo, k_hi) if type(self) is Mask else False

    def dense(self, T: int, S: int, q_offset: int = 0) -> np.ndarray:
        q_pos = q_offset + np.arange(T)[:, None]
        return np.broadcast_to(np.asarray(self.visible(q_pos, np.arange(S)[None, :], S)), (T, S))

    def pairs(self, T: int, S: int) -> float:
        """Visible (query, key) pairs of an unpacked row: the FLOP count's measure (subclasses
        without a closed form count the dense mask)."""
        return T * S if type(self) is Mask else visible_pairs(self, T, S)

    def sized(self, positions: int, keys: int) -> Mask:
        """This mask for positions below `positions` and rows of `keys` keys (most ignore it)."""
        return self

    @property
    def sinks(self) -> int:
        """How many first keys of a document may be visible outside `band`."""
        return 0

    @property
    def band(self) -> tuple[int | None, int | None]:
        """(behind, ahead): beyond the first `sinks` keys, key k is visible to query q only if
        q - behind <= k <= q + ahead (None: unbounded)."""
        return self.reach

    def preferred_tiles(self, segmented: bool) -> tuple[int, int] | None:
        """Tile sizes (block_q, block_k) that suit the pattern, or None for the engine's
        defaults. A narrow band gets small tiles (the band's width as a power of two, 16 to 64),
        since most of a large tile would be masked: for a 64-key window at T = 1024 (B = 1,
        N = 8, H = 64, forward, one CPU core) 64 x 64 tiles took 7.0 ms, 512 x 512 30.2 ms."""
        behind, ahead = self.band
        if behind is None or ahead is None:
            return None
        size = min(64, max(16, 1 << (behind + ahead).bit_length()))
        return size, size

    def __or__(self, other: Mask) -> Mask:
        return LogicalOr((self, other))

    def __and__(self, other: Mask) -> Mask:
        return LogicalAnd((self, other))


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query at position i sees key j iff j <= i."""

    shift_invariant = True

    @property
    def reach(self):
        return None, 0

    def visible(self, q_pos, k_pos, doc_len=None):
        return k_pos <= q_pos

    def pairs(self, T, S):
        return T * S / 2  # the convention: causal is half of the full count

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return k_hi <= q_lo


@dataclasses.dataclass(frozen=True)
class Window(Mask):
    """Local attention: query i sees key j iff i - left <= j <= i + right.

    `right=0` is the causal sliding window of left + 1 keys (Mistral: W keys is (W - 1, 0));
    (left, right) as in splash attention's `LocalMask`.
    """

    left: int
    right: int = 0
    shift_invariant = True

    def __post_init__(self):
        check_int("left", self.left, 0)
        check_int("right", self.right, 0)

    @property
    def reach(self):
        return self.left, self.right

    def visible(self, q_pos, k_pos, doc_len=None):
        return (k_pos >= q_pos - self.left) & (k_pos <= q_pos + self.right)

    def pairs(self, T, S):
        i = np.arange(T, dtype=np.int64)
        lo, hi = np.maximum(i - self.left, 0), np.minimum(i + self.right, S - 1)
        return int(np.maximum(hi - lo + 1, 0).sum())

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return (k_lo >= q_hi - self.left) & (k_hi <= q_lo + self.right)


@dataclasses.dataclass(frozen=True)
class Fixed(Mask):
    """Sparse Transformer "fixed" pattern (Child et al. 2019), blocks of `block` positions.

    Query i sees key j iff j is in i's block (A1) or among the last `summary` positions of any
    block (A2); `causal` adds j <= i. Without it: the paper's bidirectional form.
    """

    block: int
    summary: int
    causal: bool = True

    def __post_init__(self):
        check_int("block", self.block)
        check_int("summary", self.summary, 0, self.block)

    @property
    def reach(self):
        return None, (0 if self.causal else None)

    def _summary(self, k_pos):
        return k_pos % self.block >= self.block - self.summary

    def visible(self, q_pos, k_pos, doc_len=None):
        vis = (q_pos // self.block == k_pos // self.block) | self._summary(k_pos)
        return vis & (k_pos <= q_pos) if self.causal else vis

    def pairs(self, T, S):
        """Per query row in closed form: own block (up to i) plus the summaries of the rest."""
        b, c = self.block, self.summary
        i = np.arange(T, dtype=np.int64)
        m = i // b
        if self.causal and T != S:
            return visible_pairs(self, T, S)
        if self.causal:  # own block up to i, plus `summary` keys of each earlier block
            return int((i % b + 1 + m * c).sum())
        summaries = lambda n: np.maximum(n - (b - c), 0)  # noqa: E731  (among a block's first n)
        own = np.clip(S - m * b, 0, b)
        total = (S // b) * c + summaries(S % b)
        return int((own + total - summaries(own)).sum())

    def preferred_tiles(self, segmented):
        """Unpacked: query tiles are the blocks; key tiles the smallest divisor of the block
        that holds a block's summary (>= 8 wide), so a key tile is own-block or summary keys.
        Packed rows apply the pattern per element: the default (large) tiles."""
        if segmented:
            return None
        b = self.block
        width = b if self.summary == 0 else max(self.summary, min(8, b))
        return b, next(d for d in range(width, b + 1) if b % d == 0)

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


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
    """Attention sinks (Xiao et al. 2023, StreamingLLM): the first n keys of the document, seen
    by every query (at or after them when `causal`). Usually or-ed with a window:
    `Window(W - 1, 0) | Sinks(4)`."""

    n: int
    causal: bool = True

    def __post_init__(self):
        check_int("sinks", self.n, 0)

    @property
    def reach(self):
        return None, (0 if self.causal else None)

    @property
    def sinks(self):
        return self.n

    @property
    def band(self):
        return 0, 0  # nothing beyond the sinks (an empty band)

    def visible(self, q_pos, k_pos, doc_len=None):
        vis = k_pos < self.n
        return vis & (k_pos <= q_pos) if self.causal else vis & everywhere(q_pos, k_pos)

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        return (k_lo < self.n) & ((k_lo <= q_hi) if self.causal else everywhere(q_lo, k_lo))

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        return (k_hi < self.n) & ((k_hi <= q_lo) if self.causal else everywhere(q_lo, k_lo))

    def preferred_tiles(self, segmented):
        return None  # a few key columns: the other parts' tiles (or the defaults) serve

    def pairs(self, T, S):
        keys = min(self.n, S)
        if not self.causal:
            return T * keys
        return int(np.minimum(np.arange(T, dtype=np.int64) + 1, keys).sum())


def _unbounded_max(values):
    """The largest of `values`, None (unbounded) if any is."""
    return None if any(v is None for v in values) else max(values)


def _bounded_min(values):
    """The smallest bounded one of `values`, None if none is."""
    bounded = [v for v in values if v is not None]
    return min(bounded) if bounded else None


@dataclasses.dataclass(frozen=True)
class _Combined(Mask):
    """Masks combined element by element (`LogicalOr`, `LogicalAnd`); answers from the parts."""

    masks: tuple[Mask, ...]

    def __post_init__(self):
        if len(self.masks) < 2 or not all(isinstance(m, Mask) for m in self.masks):
            raise ValueError(f"{type(self).__name__} combines two or more Masks, got {self.masks}")

    @property
    def shift_invariant(self):
        return all(m.shift_invariant for m in self.masks)

    def _each(self, method, *args):
        return [getattr(m, method)(*args) for m in self.masks]

    def sized(self, positions, keys):
        return type(self)(tuple(m.sized(positions, keys) for m in self.masks))

    def preferred_tiles(self, segmented):
        """Those of the combined band when it is bounded, else the smallest of the parts'."""
        if None not in self.band:
            return super().preferred_tiles(segmented)
        tiles = [t for t in self._each("preferred_tiles", segmented) if t is not None]
        return min(tiles) if tiles else None


@dataclasses.dataclass(frozen=True)
class LogicalOr(_Combined):
    """What any of `masks` shows (`a | b`): "a window or the sinks" is `Window | Sinks`."""

    @property
    def reach(self):
        return tuple(_unbounded_max(r) for r in zip(*(m.reach for m in self.masks), strict=True))

    @property
    def sinks(self):
        return max(m.sinks for m in self.masks)

    @property
    def band(self):
        return tuple(_unbounded_max(b) for b in zip(*(m.band for m in self.masks), strict=True))

    def visible(self, q_pos, k_pos, doc_len=None):
        return functools.reduce(lambda a, b: a | b, self._each("visible", q_pos, k_pos, doc_len))

    def tile_visible(self, *tile):
        return functools.reduce(np.logical_or, self._each("tile_visible", *tile))

    def tile_full(self, *tile):  # conservative: full where one part is
        return functools.reduce(np.logical_or, self._each("tile_full", *tile))


@dataclasses.dataclass(frozen=True)
class LogicalAnd(_Combined):
    """What every one of `masks` shows (`a & b`)."""

    @property
    def reach(self):
        return tuple(_bounded_min(r) for r in zip(*(m.reach for m in self.masks), strict=True))

    def _tightest(self) -> Mask:
        """The part whose (sinks, band) keeps the fewest keys (each part's bound holds)."""
        cost = lambda m: m.sinks + (np.inf if m.band[0] is None else m.band[0])  # noqa: E731
        return min(self.masks, key=cost)

    @property
    def sinks(self):
        return self._tightest().sinks

    @property
    def band(self):
        return self._tightest().band

    def visible(self, q_pos, k_pos, doc_len=None):
        return functools.reduce(lambda a, b: a & b, self._each("visible", q_pos, k_pos, doc_len))

    def tile_visible(self, *tile):  # conservative: a pair each part shows may differ
        return functools.reduce(np.logical_and, self._each("tile_visible", *tile))

    def tile_full(self, *tile):
        return functools.reduce(np.logical_and, self._each("tile_full", *tile))


def _lookup(table: np.ndarray, rows, cols):
    """table[rows, cols] on numpy or jax indices, clipped into the table."""
    rows, cols = (x.clip(0, n - 1) for x, n in zip((rows, cols), table.shape, strict=True))
    if isinstance(rows, jax.Array) or isinstance(cols, jax.Array):
        return jnp.asarray(table)[rows, cols]
    return table[rows, cols]


class BlockTable(Mask):
    """Tile answers from a bool table of visible blocks [query blocks, key blocks] (mixin).

    Subclasses define `block` and `table` (for an unpacked row); a summed-area table answers
    any tile in O(1): whether it touches a visible block, and whether all its blocks are.
    """

    @functools.cached_property
    def _counts(self) -> np.ndarray:
        return np.pad(self.table.cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def _blocks(self, q_lo, q_hi, k_lo, k_hi):
        shape = np.array(self.table.shape) - 1  # bounds clipped into the table, as `visible` does
        ql, qh = (np.clip(x // self.block, 0, shape[0]) for x in (q_lo, q_hi))
        kl, kh = (np.clip(x // self.block, 0, shape[1]) for x in (k_lo, k_hi))
        c = self._counts
        seen = c[qh + 1, kh + 1] - c[ql, kh + 1] - c[qh + 1, kl] + c[ql, kl]
        return seen, (qh - ql + 1) * (kh - kl + 1)

    def tile_visible(self, q_lo, q_hi, k_lo, k_hi):
        seen, _ = self._blocks(q_lo, q_hi, k_lo, k_hi)
        return (seen > 0) & _band(q_lo, q_hi, k_lo, k_hi, self.reach)

    def tile_full(self, q_lo, q_hi, k_lo, k_hi):
        seen, area = self._blocks(q_lo, q_hi, k_lo, k_hi)
        behind, ahead = self.reach
        full = seen == area
        return full & (k_hi <= q_lo + ahead) if ahead is not None else full


@dataclasses.dataclass(frozen=True, eq=True)
class BlockSparse(BlockTable):
    """Query i sees key j iff table[i // block, j // block] (and j <= i when `causal`).

    The table is stored as bytes so the mask stays hashable (a static argument of the tile
    schedule). Build it with `BlockSparse.of(table, block, causal)`.
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

    @property
    def reach(self):
        return None, (0 if self.causal else None)

    @functools.cached_property
    def table(self) -> np.ndarray:
        table = np.frombuffer(self.table_bytes, bool).reshape(self.shape)
        return np.tril(table) if self.causal else table

    def visible(self, q_pos, k_pos, doc_len=None):
        vis = _lookup(self.table, q_pos // self.block, k_pos // self.block)
        return vis & (k_pos <= q_pos) if self.causal else vis

    def pairs(self, T, S):
        if self.causal and T != S:
            return visible_pairs(self, T, S)
        return block_pairs(self.table, self.block, T, S, self.causal)


def block_pairs(table: np.ndarray, block: int, T: int, S: int, causal: bool) -> int:
    """Visible pairs of a block table: sizes of the visible blocks (diagonals as triangles)."""
    nq, nk = -(-T // block), -(-S // block)
    size_q = np.minimum(T - np.arange(nq) * block, block).astype(np.float64)
    size_k = np.minimum(S - np.arange(nk) * block, block).astype(np.float64)
    table = table[:nq, :nk]
    pairs = size_q @ table @ size_k
    if causal:  # the diagonal blocks are triangles, not squares
        diag = np.diagonal(table) * size_q[: min(nq, nk)]
        pairs -= (diag * (diag - 1) / 2).sum()
    return int(pairs)


def visible_pairs(mask: Mask, T: int, S: int, rows: int = 2048) -> int:
    """Number of visible (query, key) pairs under `mask`, counted in row chunks (for tests)."""
    total = 0
    k_pos = np.arange(S)[None, :]
    for lo in range(0, T, rows):
        q_pos = np.arange(lo, min(lo + rows, T))[:, None]
        vis = np.broadcast_to(mask.visible(q_pos, k_pos, S), (len(q_pos), S))
        total += int(np.count_nonzero(vis))
    return total


def causal_or_full(causal: bool) -> Mask:
    return Causal() if causal else Mask()
