"""Real text available offline: the Python standard library source of the running interpreter.

Each example is one `.py` file under the interpreter's stdlib folder (site-packages excluded)
as bytes (a byte-level vocabulary of 256), with its path relative to that folder. A file goes to
`validation` when the SHA-1 of its relative path, read as a number, is 0 modulo 20 (about 5%),
else to `train`: the split depends on the path alone, so it is the same on every machine with
the same Python. Config `small` keeps the files of at most 2 KiB (a few hundred), `full` all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

VALIDATION_MODULUS = 20  # 1 file in 20 is held out


def stdlib_files(max_bytes: int | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib's .py files, sorted; at most `max_bytes` each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in path.relative_to(root).parts or not path.is_file():
            continue
        size = path.stat().st_size  # a document needs 2 bytes: one to read, one to predict
        if size >= 2 and (max_bytes is None or size <= max_bytes):
            files.append((relative, path))
    return files


def split_of(relative: str) -> str:
    digest = int(hashlib.sha1(relative.encode()).hexdigest(), 16)
    return "validation" if digest % VALIDATION_MODULUS == 0 else "train"


@dataclasses.dataclass
class PyStdlibConfig(tfds.core.BuilderConfig):
    max_bytes: int | None = None  # keep files of at most this size (None: all)

    def check(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes={self.max_bytes} must be >= 1 or None")

    def vocab_size(self) -> int:
        return 256


class Pystdlib(tfds.core.GeneratorBasedBuilder):
    """The stdlib's .py files as byte documents, split by path hash."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [  # noqa: RUF012  (TFDS reads this class attribute)
        PyStdlibConfig(name="small", max_bytes=2048),
        PyStdlibConfig(name="full"),
    ]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.builder_config.check()

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                    "path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        files = stdlib_files(self.builder_config.max_bytes)
        return {
            split: self._generate_examples([f for f in files if split_of(f[0]) == split])
            for split in ("train", "validation")
        }

    def _generate_examples(self, files: list[tuple[str, Path]]) -> Iterator[tuple[str, dict]]:
        for relative, path in files:
            text = np.frombuffer(path.read_bytes(), np.uint8)
            yield relative, {"text": text, "path": relative}
