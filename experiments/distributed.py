"""Devices for training and sweeps: the (data, seq) mesh from a config, and several hosts.

    mesh = make_mesh(data=0, seq=4)          # 0: the devices the other axis leaves
    with jax.set_mesh(mesh): ...             # `ring` finds the `seq` axis here
    batch = place_batch(mesh, numpy_batch)   # rows over `data`, positions over `seq`

Parameters and optimizer state are replicated; a batch is split by rows over `data` and by
position over `seq`, which `attention="ring"` uses as its ring (other variants let the compiler
gather what they need). The axes are automatic (`AxisType.Auto`): the compiler propagates the
shardings through the model, so model code needs no annotations.

Several hosts: `initialize(...)` calls `jax.distributed.initialize` when a multi-host run is
asked for (flags, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), before
anything touches the devices. Every process then reads the same global batch and places the
slices of its own devices (`jax.make_array_from_callback`): simple, and a run sees the same
batches on any number of hosts.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import attention_variants as av
from attention_variants import ring
from experiments.configlib import ConfigError

AXES = ("data", "seq")


def make_mesh(data: int = 0, seq: int = 1) -> Mesh:
    """A ("data", "seq") mesh of every device; data=0 (or seq=0) takes what the other leaves.

    Raises ConfigError naming `mesh` when the sizes do not multiply to the device count."""
    count = jax.device_count()
    for name, value in (("data", data), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"mesh.{name}", f"must be an int >= 0, got {value!r}")
    if data == 0 and seq == 0:
        data, seq = count, 1
    data = data or count // seq
    seq = seq or count // data
    if data * seq != count:
        raise ConfigError(
            "mesh", f"data={data} x seq={seq} = {data * seq}, but there are {count} devices"
        )
    return jax.make_mesh((data, seq), AXES, axis_types=(AxisType.Auto,) * 2)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: rows over `data`, positions over `seq`."""
    return NamedSharding(mesh, PartitionSpec(*AXES))


def check_batch(
    mesh: Mesh, batch_size: int, row: int, model: Any = None, seq2seq: bool = False
) -> None:
    """ConfigError naming the field when batches [batch_size, row] do not split over the mesh:
    rows over `data`, positions over `seq`. Where `model` (a ModelConfig; `seq2seq`: of an
    EncoderDecoder, whose encoder and decoder read rows of `row` tokens) runs ring attention
    on a `seq` axis, each tower's rows must cut into the ring's chunks: 2 x seq for a causal
    zigzag ring, one more position with a CLS token."""
    data, seq = mesh.shape["data"], mesh.shape["seq"]
    if batch_size % data:
        raise ConfigError("batch_size", f"{batch_size} rows do not split over mesh.data={data}")
    if row % seq:
        raise ConfigError("mesh.seq", f"rows of {row} positions do not split over seq={seq}")
    if model is None or seq == 1:
        return
    towers = [("the model", model)]
    if seq2seq:  # an EncoderDecoder's decoder is causal whatever `causal` says
        towers = [("the encoder", model.encoder()), ("the decoder", model.replace(causal=True))]
    for tower, cfg in towers:
        if "ring" not in cfg.pattern:
            continue
        options = av.spec("ring").options(**cfg.options_of("ring"))
        cls = int(bool(cfg.num_classes) and cfg.pooling == "cls")
        unfit = ring.unfit_rows(row + cls, seq, options["layout"], cfg.causal,
                                options["block_q"], options["block_k"])  # fmt: skip
        if unfit is not None:
            with_cls = " (the row and its CLS position: use pooling='mean')" if cls else ""
            raise ConfigError("mesh.seq", f"ring attention in {tower} cannot cut its rows of "
                              f"{row + cls} positions{with_cls}: {unfit}")  # fmt: skip


def pad_rows(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Adds all-zero rows (zero weight: they change no weighted sum) up to a multiple of rows."""
    extra = -len(next(iter(batch.values()))) % multiple
    if not extra:
        return batch
    return {k: np.pad(v, [(0, extra)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def place_batch(mesh: Mesh, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global numpy batch as arrays split over the mesh; each process supplies the slices
    of its own devices (every process holds the same global batch)."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        for k, v in batch.items()
    }


def place_state(mesh: Mesh, state: Any) -> Any:
    """The training state replicated over the mesh."""
    return jax.device_put(state, replicated(mesh))


def abstract_state(mesh: Mesh, state: Any) -> Any:
    """Shapes, dtypes and (replicated) shardings of `state`: what orbax restores into, so a
    checkpoint written on any mesh lands on this one."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize(
    enable: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's multi-host runtime when asked: `enable`, any argument, or its environment
    variable (ENV). Unset values are left to `jax.distributed.initialize`'s detection (TPU
    pods, SLURM, Open MPI, Kubernetes). Returns whether it was started. Call it first: before
    anything asks JAX for its devices."""
    given = dict(
        coordinator_address=coordinator_address or os.environ.get(ENV["coordinator_address"]),
        num_processes=num_processes or os.environ.get(ENV["num_processes"]),
        process_id=process_id if process_id is not None else os.environ.get(ENV["process_id"]),
    )
    if not enable and all(v is None for v in given.values()):
        return False
    for name in ("num_processes", "process_id"):
        if given[name] is not None:
            given[name] = int(given[name])
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return True


def define_flags() -> None:
    """--distributed, --coordinator_address, --num_processes, --process_id (absl)."""
    from absl import flags

    flags.DEFINE_bool("distributed", False, "start jax.distributed (multi-host); see README")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
    flags.DEFINE_integer("num_processes", None, "processes in a multi-host run")
    flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run")


def initialize_from_flags() -> bool:
    from absl import flags

    f = flags.FLAGS
    return initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
