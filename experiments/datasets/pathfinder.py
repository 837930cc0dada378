"""Pathfinder (Linsley et al. 2018), the image task of the Long Range Arena (Tay et al. 2020),
drawn here from the paper's description: are two dots joined by one dashed path?

An image of `size` x `size` pixels holds 2 + `distractors` dashed paths on a black ground.
A path starts at a random point and heading and lays `segments` dashes of `dash` pixels, each
followed by a gap of `gap`, turning by up to `turn` radians after each dash (a smooth contour,
as the paper's). Two dots (3 x 3 squares) sit on path ends: in a positive image (label 1) at
both ends of the first path, in a negative one (label 0) at one end of the first and one of the
second, so both kinds show the same number of paths and dots. Paths keep `SEPARATION` pixels
apart (Chebyshev), so the label follows from the drawing: widen every drawn pixel by one (which
closes the gaps of a path but never joins two paths) and ask whether the dots fall in one
connected piece. Pixels: 0 ground, PATH on paths, DOT on dots. A row is the image flattened
row by row into `size` ** 2 tokens (LRA's Pathfinder-32: 1024), a classification row (base.py)
with 2 classes; what differs from the paper's images: no anti-aliasing, square dots, and
paths that never cross.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from experiments.datasets.base import TaskBuilder, TaskConfig, classification_row

PATH, DOT = 128, 255  # pixel values
SEPARATION = 4  # fewest pixels (Chebyshev) between two paths: > 2 + 1, so widening by one
# pixel (3 x 3) closes a path's 1-pixel gaps and never touches another path
TRIES = 200  # draws of one path before the image is started again
RESTARTS = 1000  # images started before the drawing gives up (the paths cannot fit)


@dataclasses.dataclass
class PathfinderConfig(TaskConfig):
    """Images of size x size (rows of size ** 2 pixels) with 2 + distractors paths."""

    seq_len: int = 1024  # pixels: size ** 2
    size: int = 32  # image side
    segments: int = 5  # dashes per path (the paper's contour length)
    dash: int = 3  # pixels per dash
    gap: int = 1  # pixels between dashes (<= 1: widening by one pixel closes it)
    turn: float = 0.6  # largest change of heading after a dash (radians)
    distractors: int = 2  # paths without dots

    def check(self) -> None:
        super().check()
        if self.seq_len != self.size**2:
            raise ValueError(f"seq_len={self.seq_len} must be size ** 2 = {self.size**2}")
        if self.size < 8 or self.segments < 1 or self.dash < 1 or not 0 <= self.gap <= 1:
            raise ValueError(
                f"need size >= 8, segments >= 1, dash >= 1 and gap in [0, 1], got size="
                f"{self.size}, segments={self.segments}, dash={self.dash}, gap={self.gap}"
            )

    def vocab_size(self) -> int:
        return 256  # pixel values

    def max_targets(self) -> int:
        return 1

    def num_classes(self) -> int:
        return 2


def draw_path(config: PathfinderConfig, rng: np.random.Generator) -> np.ndarray | None:
    """The pixels [n, 2] (row, column) of one dashed path placed at a random offset where it
    fits with room for a dot at each end, None when it is too large for the image."""
    turns = rng.uniform(-config.turn, config.turn, size=config.segments - 1)
    heading = rng.uniform(0, 2 * np.pi) + np.concatenate([[0.0], np.cumsum(turns)])
    step = np.stack([np.sin(heading), np.cos(heading)], -1)  # [segments, 2]: each dash's
    stride = (config.dash + config.gap) * step  # from one dash's start to the next's
    starts = np.cumsum(stride, axis=0) - stride
    along = np.arange(config.dash)[None, :, None] * step[:, None]  # [segments, dash, 2]
    pixels = np.rint(rng.uniform(0, 1, size=2) + starts[:, None] + along).reshape(-1, 2)
    pixels = pixels.astype(np.int64)
    low, high = pixels.min(0), pixels.max(0)
    room = (config.size - 2) - (high - low)  # offsets keeping a 1-pixel border for the dots
    if (room < 1).any():
        return None
    return pixels - low + 1 + rng.integers(0, room)


def near(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bool [size, size]: the pixels closer than SEPARATION (Chebyshev) to any of `pixels`."""
    reach = np.arange(-SEPARATION + 1, SEPARATION)
    offsets = np.stack(np.meshgrid(reach, reach, indexing="ij"), -1).reshape(-1, 2)
    around = np.clip((pixels[:, None] + offsets[None]).reshape(-1, 2), 0, size - 1)
    mask = np.zeros((size, size), bool)
    mask[around[:, 0], around[:, 1]] = True
    return mask


def footprint(pixels: np.ndarray, dots: list[np.ndarray]) -> np.ndarray:
    """A path's pixels with the 3 x 3 squares of the dots at its ends."""
    squares = [end + np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]) for end in dots]
    return np.concatenate([pixels, *squares])


def pathfinder_example(config: PathfinderConfig, rng: np.random.Generator) -> dict:
    """One image drawn from `rng` (see the module docstring), as a classification row."""
    connected = bool(rng.integers(2))
    for _ in range(RESTARTS):
        paths: list[np.ndarray] = []
        taken = np.zeros((config.size, config.size), bool)  # too close to a placed path
        for index in range(2 + config.distractors):
            for _ in range(TRIES):
                pixels = draw_path(config, rng)
                if pixels is None:
                    continue
                # the dots: both ends of path 0 (connected), or its start and path 1's end
                ends = {0: [pixels[0], pixels[-1]] if connected else [pixels[0]]}
                ends[1] = [] if connected else [pixels[-1]]
                drawn = footprint(pixels, ends.get(index, []))
                if not taken[drawn[:, 0], drawn[:, 1]].any():
                    paths.append(drawn)
                    taken |= near(drawn, config.size)
                    break
            else:
                break  # no room for this path: start the image again
        if len(paths) == 2 + config.distractors:
            break
    else:
        raise ValueError(
            f"{2 + config.distractors} paths of {config.segments} dashes (and their dots) do "
            f"not fit {SEPARATION} pixels apart in a {config.size} x {config.size} image: "
            "make `size` larger or `segments` or `distractors` smaller"
        )
    image = np.zeros((config.size, config.size), np.int32)
    for drawn in paths:
        image[drawn[:, 0], drawn[:, 1]] = PATH
    dot_count = 2 if connected else 1
    for index, count in ((0, dot_count), (1, 2 - dot_count)):
        squares = paths[index][len(paths[index]) - 9 * count :]  # footprint puts dots last
        image[squares[:, 0], squares[:, 1]] = DOT
    return classification_row(image.reshape(-1), config.seq_len, int(connected))


class Pathfinder(TaskBuilder):
    """Pathfinder images: `small` (16 x 16, no distractor) for tests, `pathfinder16` the same
    kind for a CPU's training, `pathfinder32` the size of LRA's (32 x 32, two distractors;
    about 15 ms an image to draw here, so 5 minutes to build)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    FINGERPRINT = "9240b7cffaca132f"  # base.fingerprint at VERSION
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        PathfinderConfig(
            name="pathfinder16",
            size=16,
            seq_len=256,
            segments=3,
            distractors=0,
            num_train=20000,
            num_test=1000,
        ),  # fmt: skip
        PathfinderConfig(name="pathfinder32", num_train=20000, num_test=1000),
    ]
    BUILDER_CONFIGS.insert(  # noqa: RUF012
        0, dataclasses.replace(BUILDER_CONFIGS[0], name="small", num_train=256, num_test=64)
    )
    example = staticmethod(pathfinder_example)
