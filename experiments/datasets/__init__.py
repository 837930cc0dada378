"""The project's TFDS datasets, generated here (nothing is downloaded), and their grain input
pipeline. Importing this package registers the builders with TFDS:

    import experiments.datasets
    builder = experiments.datasets.prepare("mqar/small", data_dir)   # builds it when missing
    tfds.data_source("mqar/small", data_dir=data_dir)["train"][0]

- `mqar`: multi-query associative recall (Zoology); configs `small`, `zoology`.
- `listops`: Long Range Arena's ListOps; configs `small`, `short`, `lra`, and the same as
  classification rows (LRA's protocol), `classify-small`, `classify-short`, `classify-lra`.
- `passkey`: passkey retrieval, a needle in a haystack; configs `small`, `short`, `long`.
- `pathfinder`: Pathfinder (LRA's image task): two dots joined by a dashed path or not;
  configs `small`, `pathfinder16`, `pathfinder32`.
- `reversal`: a synthetic translation (the source reversed, in another alphabet) for the
  encoder-decoder; configs `small`, `short`, `long`.
- `pystdlib`: the running Python's standard library source, byte-level; configs `small`,
  `full` (named by the Python version: `full-py3.11`).

The builders write array_record by default, so the standard client needs no TensorFlow:
`tfds.builder("mqar/small", data_dir=D).download_and_prepare()` builds a dataset and
`tfds.data_source` reads it (random access, numpy). `tfds.load` and `builder.as_dataset`
return tf.data pipelines and so need TensorFlow, which the project does not install. Each
builder pins a FINGERPRINT of its generator's output next to its VERSION (base.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from experiments.datasets.base import ProjectBuilder, fingerprint
from experiments.datasets.listops import Listops, ListOpsConfig
from experiments.datasets.mqar import Mqar, MqarConfig
from experiments.datasets.passkey import Passkey, PasskeyConfig
from experiments.datasets.pathfinder import Pathfinder, PathfinderConfig
from experiments.datasets.pystdlib import Pystdlib, PyStdlibConfig
from experiments.datasets.reversal import Reversal, ReversalConfig

__all__ = ["ListOpsConfig", "Listops", "Mqar", "MqarConfig", "Passkey", "PasskeyConfig"]
__all__ += ["Pathfinder", "PathfinderConfig"]
__all__ += ["PyStdlibConfig", "Pystdlib", "Reversal", "ReversalConfig"]
__all__ += ["BUILDERS", "builder_class", "config_for", "fingerprint", "prepare"]

BUILDERS: tuple[type[ProjectBuilder], ...] = (
    Listops, Mqar, Passkey, Pathfinder, Pystdlib, Reversal
)  # fmt: skip


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """The registered builder class of `name` ("mqar"); ValueError naming the known ones."""
    try:
        return tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        known = ", ".join(b.name for b in BUILDERS)
        raise ValueError(f"unknown dataset {name!r}; the project's: {known}") from None


def config_for(name: str, **fields: Any) -> tfds.core.BuilderConfig:
    """A config of dataset `name` with `fields` (e.g. seq_len, num_pairs), named by their hash
    so that each setting is built once; `.check()` says whether it can be built."""
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    config_class = type(builder_class(name).BUILDER_CONFIGS[0])
    return config_class(name=f"config_{digest}", **fields)


def prepare(
    name: str, data_dir: str | None = None, config: tfds.core.BuilderConfig | None = None
) -> tfds.core.DatasetBuilder:
    """The builder of `name` ("mqar/small", or "mqar" with a `config`), written (array_record)
    into `data_dir` (None: TFDS_DATA_DIR or TFDS's default) when it is not there yet."""
    kwargs = {"config": config} if config is not None else {}
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    if "://" in str(builder.data_dir):  # a bucket: no local lock
        builder.download_and_prepare()
        return builder
    folder = Path(builder.data_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer: processes of one sweep may race here
        builder.download_and_prepare()  # nothing to do once prepared
    return builder
