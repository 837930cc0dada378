"""A sweep cell and what its kinds share: the cell's identity (its resume key and the setting
a workdir holds), what a kind builds (`Built`: a function and its inputs, which the runner in
`experiments/sweep.py` compiles, predicts memory for and times), and the helpers the kinds in
`experiments/kinds/` use (packed document ids, FLOP counts, the cell's model, its mesh).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import use_abstract_mesh

import attention_variants as av

BACKWARD_FLOPS = 2.5  # convention: backward = 2.5 x forward, so fwd_bwd = 3.5 x forward
DECODE_STEPS = 16  # single-token steps per timed decode call (a lax.scan, as in generate)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of a sweep. `key()` identifies it for resume; `model` only for train_step.
    `segments` > 1 packs that many documents into each row (contiguous, near-equal lengths)."""

    kind: str
    variant: str
    options: Mapping[str, Any]
    seq_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    mode: str
    causal: bool = True
    segments: int = 1
    model: Mapping[str, Any] | None = None
    task: Mapping[str, Any] | None = None  # train_eval: the dataset fields that vary by cell
    training: Mapping[str, Any] | None = None  # train_eval: the config's data.* and train.*
    devices: int = 1  # kernel: devices on the mesh's `seq` axis (ring variants), 1: no mesh
    seed: int | None = None  # train_eval: the training run's seed (parameters, data order)
    learning_rate: float | None = None  # train_eval: its peak learning rate
    task_spec: Mapping[str, str] | None = None  # train_eval: the task fields as written (L/16)

    def fields(self) -> dict[str, Any]:
        """The cell's identifying fields as they appear in a result row."""
        out = {
            "variant": self.variant,
            "options": dict(self.options),
            "seq_len": self.seq_len,
            "batch": self.batch,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "mode": self.mode,
            "causal": self.causal,
            "segments": self.segments,
        }
        if self.model is not None:
            out["model"] = dict(self.model)
        if self.task is not None:
            out["task"] = dict(self.task)
        if self.training is not None:
            out["training"] = {
                k: dict(v) if isinstance(v, Mapping) else list(v) for k, v in self.training.items()
            }
        if self.devices > 1:
            out["devices"] = self.devices
        if self.seed is not None:
            out.update(seed=self.seed, learning_rate=self.learning_rate)
        if self.task_spec is not None and self.task_spec != {
            k: str(v) for k, v in (self.task or {}).items()
        }:
            out["task_spec"] = dict(self.task_spec)  # labels: "num_pairs=L/16" across lengths
        return out

    def key(self) -> str:
        return row_key(self.fields())


# What a workdir's rows must share to be read as one experiment; lengths, variants and modes
# (the axes of the tables) may differ. `device` is added by the runner.
SETTING_FIELDS = ("batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "segments")
SETTING_FIELDS += ("model", "training", "device")
# A cell with a row of one of these statuses was measured; `error` and `skipped` ones are not.
MEASURED = ("ok", "oom", "crashed")
KEY_FIELDS = ("variant", "options", "seq_len", "mode", "task", "devices", "seed", "learning_rate")
KEY_FIELDS += SETTING_FIELDS[:-1]


# Model fields that training configs gained after rows were written: each one's default keeps
# the old behaviour, so a `train_eval` row without one reads as that default. A new field of
# configs/train.py's `model` is added here (tests/test_quality.py reads such a row).
ADDED_MODEL_FIELDS = ("variant_layer", "attention_sinks", "causal", "num_classes", "pooling")


def with_new_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A row written before its variant gained options or the training model gained fields
    (ADDED_MODEL_FIELDS), with those at their defaults, so it keeps its cell's key and setting."""
    return _with_new_model_fields(_with_new_options(row))


def _with_new_model_fields(row: dict[str, Any]) -> dict[str, Any]:
    from transformer import ModelConfig

    training = row.get("training")
    model = training.get("train", {}).get("model") if isinstance(training, dict) else None
    if not isinstance(model, dict) or all(name in model for name in ADDED_MODEL_FIELDS):
        return row
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model = {**{name: defaults[name] for name in ADDED_MODEL_FIELDS}, **model}
    return {**row, "training": {**training, "train": {**training["train"], "model": model}}}


def _with_new_options(row: dict[str, Any]) -> dict[str, Any]:
    """A row measured before its variant gained options, with those options at their defaults
    (a new option's default keeps the old behaviour). A hybrid's options are per variant; rows
    of variants no longer registered stay as they are."""
    from transformer.config import layer_pattern

    options, variant = row.get("options"), row.get("variant")
    if not isinstance(options, dict) or not isinstance(variant, str):
        return row
    try:
        names = layer_pattern(variant)
    except ValueError:
        return row
    filled = lambda name, given: {**av.spec(name).defaults, **given}  # noqa: E731
    if not all(name in av.names() for name in names):
        return row
    if len(set(names)) == 1 and variant == names[0]:
        return {**row, "options": filled(variant, options)}
    each = {name: filled(name, options.get(name) or {}) for name in dict.fromkeys(names)}
    return {**row, "options": each}


def row_key(row: Mapping[str, Any], fields: tuple[str, ...] = KEY_FIELDS) -> str:
    """The resume key of a result row (or of `Cell.fields()`)."""
    return json.dumps({f: row.get(f) for f in fields}, sort_keys=True, default=str)


def setting(row: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The row's experiment setting: (field, value) pairs of SETTING_FIELDS."""
    return tuple((f, json.dumps(row.get(f), sort_keys=True)) for f in SETTING_FIELDS)


class MixedRows(ValueError):
    """Rows of different settings (shapes, dtype, device) where one experiment was expected."""


def check_one_setting(rows: Iterable[Mapping[str, Any]], where: str) -> None:
    """Raises MixedRows naming each field whose value differs between rows, with row counts."""
    counts: dict[str, Counter] = {f: Counter() for f in SETTING_FIELDS}
    for row in rows:
        for name, value in setting(row):
            counts[name][value] += 1
    mixed = {f: c for f, c in counts.items() if len(c) > 1}
    if mixed:
        parts = [
            f"{f} " + ", ".join(f"{v} ({n})" for v, n in c.most_common()) for f, c in mixed.items()
        ]
        missing = any("null" in c for c in mixed.values())
        raise MixedRows(
            f"rows of different settings in {where}: {'; '.join(parts)}"
            + (" (null: rows written by an older version, without the field)" if missing else "")
            + ". One workdir holds one setting: use another --workdir (or remove the other rows)."
        )


@dataclasses.dataclass
class Built:
    """A cell ready to measure: `fn(*args)` is jitted and timed; FLOPs and tokens per call."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    useful_flops: float | None
    tokens: int
    # After timing, quality(workdir, out) trains and evaluates (train_eval): more row fields.
    quality: Callable[[Path, TextIO], dict[str, Any]] | None = None
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # more row fields
    # The index of an argument that fn returns as its second output, donated: each timed call
    # takes over the previous call's (a decoding cache), as a loop would (`bench.chained`).
    # args[carry] is consumed by the first call: nothing may call fn with `args` again.
    carry: int | None = None


def document_ids(cell: Cell) -> jax.Array | None:
    """[B, T] int32 ids of the cell's `segments` packed documents (contiguous, lengths T //
    segments or one more), or None for one document per row."""
    if cell.segments == 1:
        return None
    ids = np.arange(cell.seq_len) * cell.segments // cell.seq_len
    return jnp.asarray(np.broadcast_to(ids, (cell.batch, cell.seq_len)), jnp.int32)


def variant_options(cell: Cell) -> dict[str, dict[str, Any]]:
    """{variant: its options} of the cell: its one variant, or each variant of a hybrid's
    layer pattern (`cell.variant` "sliding_window*3+dense"; options per variant)."""
    from transformer.config import layer_pattern

    pattern = layer_pattern(cell.variant)
    if len(pattern) == 1:
        return {cell.variant: dict(cell.options)}
    return {name: dict(cell.options[name]) for name in dict.fromkeys(pattern)}


def layer_variants(cell: Cell, layers: int) -> list[str]:
    """The variant of each of the model's blocks (a hybrid's pattern repeated)."""
    from transformer.config import layer_pattern

    pattern = layer_pattern(cell.variant)
    return [pattern[i % len(pattern)] for i in range(layers)]


def attention_flops(cell: Cell, causal: bool, variant: str | None = None) -> float:
    """Useful forward FLOPs of the cell's attention (the variant's own count; of `variant`, one
    of a hybrid's): each packed document attends within itself, so the count is summed over
    the documents' lengths."""
    variant = variant or cell.variant
    spec = av.spec(variant)
    options = spec.options(**variant_options(cell)[variant])
    T, B, N, H = cell.seq_len, cell.batch, cell.heads, cell.head_dim
    lengths = Counter(np.bincount(np.arange(T) * cell.segments // T).tolist())
    return float(
        sum(n * spec.flops(B, L, L, N, H, causal=causal, **options) for L, n in lengths.items())
    )


def implementation_of(cell: Cell) -> str:
    """The row of the variant's implementation table that the cell's attention calls run
    ("auto" resolved for this backend, the cell's shapes, dtype, packing and mesh); for a
    hybrid, each variant's ("dense=jax+sliding_window=jax")."""
    variants = variant_options(cell)
    if len(variants) > 1 or cell.variant not in variants:
        return "+".join(f"{n}={_implementation(cell, n, o)}" for n, o in variants.items())
    return _implementation(cell, cell.variant, variants[cell.variant])


def _implementation(cell: Cell, variant: str, options: dict[str, Any]) -> str:
    spec = av.spec(variant)
    options = spec.options(**options)
    B, T, N, K, H = cell.batch, cell.seq_len, cell.heads, cell.kv_heads, cell.head_dim
    S, call = T, {"causal": cell.causal}
    if cell.kind == "decode":  # the model's cache: queries at a traced offset
        T = 1 if cell.mode == "decode" else T
        S += DECODE_STEPS if cell.mode == "decode" else 0
        call["q_offset"] = jnp.zeros((), jnp.int32)
    elif cell.segments > 1:
        call["segment_ids"] = jax.ShapeDtypeStruct((B, T), jnp.int32)
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.dtype(cell.dtype))
    kv = jax.ShapeDtypeStruct((B, S, K, H), jnp.dtype(cell.dtype))
    with within(seq_mesh(cell.devices)):
        return spec.choose(options.pop("implementation"), q, kv, kv, **call, **options)[0]


def within(mesh: jax.sharding.Mesh | None):
    """The context in which traced code sees `mesh` as current (nothing for None)."""
    return contextlib.nullcontext() if mesh is None else use_abstract_mesh(mesh.abstract_mesh)


def mesh_aware(name: str) -> bool:
    """Whether the variant shards over a mesh axis (it has an `axis` option, as `ring`; a
    hybrid's pattern never: meshes are swept for kernels)."""
    return name in av.names() and "axis" in av.spec(name).defaults


def seq_mesh(devices: int) -> jax.sharding.Mesh | None:
    """A mesh of this process's first `devices` devices on one `seq` axis (None for 1: no
    mesh). The sweep measures one host: its timing decisions are its own."""
    if devices == 1:
        return None
    return jax.sharding.Mesh(np.array(jax.local_devices()[:devices]), ("seq",))


# ModelConfig fields that a train_step cell sets itself (from the sweep's fields).
TRAIN_STEP_FIELDS = (
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_len",
    "attention",
    "attention_options",
    "dtype",
)


def cell_model(cell: Cell, max_len: int):
    """The TransformerLM of a train_step or decode cell: the sweep's shape fields, the cell's
    variant and the config's model.* section."""
    from transformer import ModelConfig, TransformerLM

    cfg = ModelConfig(
        num_heads=cell.heads,
        num_kv_heads=cell.kv_heads,
        head_dim=cell.head_dim,
        max_len=max_len,
        attention=cell.variant,
        attention_options=dict(cell.options),
        dtype=cell.dtype,
        **dict(cell.model or {}),
    )
    return cfg, TransformerLM(cfg)


def train_step_flops(cell: Cell, params: Any, cfg: Any) -> float:
    """Useful FLOPs of a training step of the model `cfg` (a ModelConfig): 6 x (matmul
    weights) x tokens for the projections, MLP and logits (Kaplan et al. 2020), plus each
    layer's attention (causal or not, as the model's) at 3.5 x its forward. Matmul weights:
    params with two or more axes except lookup tables (positions, and the input embedding
    when it is not the output layer: untied, or a classifier, whose head runs once per row)."""
    layers = layer_variants(cell, cfg.num_layers)
    attention = sum(attention_flops(cell, cfg.causal, v) for v in layers)
    tied = cfg.tie_embeddings and not cfg.num_classes
    tokens = cell.batch * cell.seq_len
    flops = 6.0 * matmul_weights(params, tied) * tokens + attention * (1 + BACKWARD_FLOPS)
    if cfg.num_classes:  # the head [D, classes] ran on one pooled vector per row
        flops -= 6.0 * cfg.width * cfg.num_classes * (tokens - cell.batch)
    return flops


def matmul_weights(params: Any, tied: bool) -> int:
    """Parameters used in matmuls: those with two or more axes except lookup tables."""
    lookups = ("position_embed",) if tied else ("position_embed", "embed")
    weights = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if x.ndim >= 2 and not any(n in lookups for n in names):
            weights += x.size
    return weights
