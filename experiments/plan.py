"""Planning a sweep: its config (validated, errors naming the field) becomes the list of cells
to measure, in run order."""

from __future__ import annotations

from typing import Any

import jax

import attention_variants as av
from experiments.cells import TRAIN_STEP_FIELDS, Cell, mesh_aware
from experiments.configlib import ConfigError, csv_field, field, float_field, int_field
from experiments.kinds import KINDS, MODES
from transformer.budget import MATCH_FIELDS

# train_eval config fields (comma-separated) swept like lengths: MQAR's pairs, ListOps' bounds
TASK_AXES = ("num_pairs", "min_len", "max_len")


DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(value: str, platform: str) -> str:
    """`auto` is float32 on CPU and bfloat16 on accelerators."""
    if value == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    if value not in DTYPES:
        raise ConfigError("dtype", f"must be 'auto' or one of {DTYPES}, got {value!r}")
    return value


def resolve_head_dim(value: int, platform: str) -> int:
    """0 is 64 on CPU and 128 on accelerators (the head size fused kernels are tuned for)."""
    if value == 0:
        return 64 if platform == "cpu" else 128
    return value


def _parts(name: str, kind: str) -> tuple[str, ...]:
    """The registry names in a `variants` entry: one, or a hybrid's layer pattern (names joined
    by "+", "name*n" for n blocks: model kinds only). ConfigError naming what is wrong."""
    from transformer.config import layer_pattern

    known = av.names()
    try:
        parts = layer_pattern(name)
    except ValueError as e:
        raise ConfigError("variants", str(e)) from None
    for part in parts:
        if part not in known:
            raise ConfigError("variants", f"unknown variant {part!r}; known: {', '.join(known)}")
    if len(parts) > 1 and kind not in ("train_step", "train_eval", "decode"):
        raise ConfigError("variants", f"a hybrid ({name!r}) is a model: kind {kind!r} runs kernels")
    return parts


def _variants(config: Any) -> list[str]:
    known = av.names()
    names = csv_field(config, "variants")
    if names == ["all"]:  # mesh-aware variants (ring) only where a mesh is swept
        meshed = seq_devices(config) != [1]
        names = [n for n in known if meshed or not mesh_aware(n)]
    parts = {name: _parts(name, field(config, "kind")) for name in names}
    if config.get("only_long_context", False):
        names = [n for n in names if all(av.spec(p).long_context for p in parts[n])]
        if not names:
            raise ConfigError("variants", "none is registered long_context (only_long_context)")
    baselines = [b for b in csv_field(config, "baselines") if b in names]
    return baselines + [n for n in names if n not in baselines]  # baselines run first


def _options(config: Any, variants: list[str]) -> dict[str, dict[str, Any]]:
    given = field(config, "options")
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    for name in given:
        if name not in av.names():
            raise ConfigError(f"options.{name}", f"unknown variant; known: {', '.join(av.names())}")
    from transformer.config import layer_pattern

    merged = {}
    for name in dict.fromkeys(p for v in variants for p in layer_pattern(v)):
        try:
            merged[name] = av.spec(name).options(**dict(given.get(name) or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"options.{name}", str(e)) from None
    hybrids = {v: {p: merged[p] for p in layer_pattern(v)} for v in variants if v not in merged}
    return {**merged, **hybrids}  # a hybrid's: {variant: options} of each of its variants


def _model(config: Any) -> dict[str, Any]:
    """The model section of a train_step config, checked by building a ModelConfig."""
    from transformer import ModelConfig

    fields = field(config, "model")
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    reserved = sorted(set(fields) & set(TRAIN_STEP_FIELDS))
    if reserved:
        raise ConfigError(
            "model", f"{', '.join(reserved)} come from the sweep's own fields, not model.*"
        )
    try:
        ModelConfig(num_heads=1, num_kv_heads=1, head_dim=8, max_len=8, **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError("model", str(e)) from None
    if fields.get("variant_layer") is True:  # the default (added later: older rows lack it)
        del fields["variant_layer"]
    return fields


def plan_cells(config: Any, dtype: str) -> list[Cell]:
    """Validates `config` (raising ConfigError naming the field) and lists its cells in run
    order: lengths ascending, then variants (baselines first), then modes."""
    kind = field(config, "kind")
    if kind not in KINDS:
        raise ConfigError("kind", f"must be one of {tuple(KINDS)}, got {kind!r}")
    variants = _variants(config)
    options = _options(config, variants)
    try:
        lengths = sorted({int(s) for s in csv_field(config, "lengths")})
    except ValueError:
        raise ConfigError("lengths", f"must be positive ints, got {config.lengths!r}") from None
    if lengths[0] <= 0:
        raise ConfigError("lengths", f"must be positive ints, got {config.lengths!r}")
    modes = csv_field(config, "modes")
    for mode in modes:
        if mode not in MODES[kind]:
            raise ConfigError("modes", f"{mode!r} is not one of {MODES[kind]} (kind {kind!r})")
    batch, heads = int_field(config, "batch"), int_field(config, "heads")
    kv_heads = int_field(config, "kv_heads")
    head_dim = resolve_head_dim(int_field(config, "head_dim", 0), jax.default_backend())
    if heads % kv_heads:
        raise ConfigError("kv_heads", f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    int_field(config, "seed", 0)
    int_field(config, "min_repeats")
    if int_field(config, "max_repeats") < config.min_repeats:
        raise ConfigError("max_repeats", f"must be >= min_repeats={config.min_repeats}")
    for name in ("cell_budget_s", "long_call_s", "max_call_s"):
        float_field(config, name)
    float_field(config, "time_budget_s", strict=False)
    if not 0 < float_field(config, "memory_fraction") <= 1:
        raise ConfigError("memory_fraction", f"must be in (0, 1], got {config.memory_fraction}")
    int_field(config, "gemm_size", 0)
    causal = field(config, "causal")
    if not isinstance(causal, bool):
        raise ConfigError("causal", f"must be True or False, got {causal!r}")
    segments = int_field(config, "segments")
    if segments > lengths[0]:
        raise ConfigError("segments", f"{segments} documents do not fit in T={lengths[0]}")
    model, training = None, None
    if kind in ("train_step", "train_eval", "decode"):
        model = _model(config)
        if causal != model.get("causal", True):
            raise ConfigError("causal", f"{kind} cells run the model, whose model.causal is "
                              f"{model.get('causal', True)}: set both alike")  # fmt: skip
        if kind != "train_eval" and model.get("num_classes"):
            raise ConfigError("model.num_classes", f"{kind} cells run a language model (0)")
        if kind == "decode" and not causal:
            raise ConfigError("causal", "decoding needs a causal model")
    if kind == "decode" and segments != 1:
        raise ConfigError("segments", "decoding reads one sequence per row: segments must be 1")
    if kind == "train_step":
        float_field(config, "learning_rate")
    seeds, rates = [None], [None]
    if kind == "train_eval":
        _tasks(config, lengths[0])  # validates the task section
        training = {"data": config.data.to_dict(), "train": training_fields(config.train)}
        if config.get("extrapolate"):
            training["extrapolate"] = _numbers(config, "extrapolate", int, 2)
        seeds = _numbers(config, "seeds", int, 0)
        rates = _numbers(config, "learning_rates", float, 0.0)
    shape = (batch, heads, kv_heads, head_dim, dtype)
    devices = _seq_devices(config, kind)
    tasks_at = {T: [(None, None)] for T in lengths}
    if kind == "train_eval":
        tasks_at = _buildable(config, {T: _tasks(config, T) for T in lengths})
    return [
        Cell(
            kind,
            v,
            options[v],
            T,
            *shape,
            mode,
            causal,
            segments,
            model,
            task,
            training,
            devices=n,
            seed=seed,
            learning_rate=rate,
            task_spec=spec,
        )  # fmt: skip
        for T in lengths
        for v in variants
        for n in (devices if mesh_aware(v) else [1])
        for task, spec in tasks_at[T]
        for rate in rates
        for seed in seeds
        for mode in modes
    ]


def seq_devices(config: Any) -> list[int]:
    """The config's `seq_devices` axis (default [1]: no mesh)."""
    if "seq_devices" not in config:
        return [1]
    try:
        values = sorted({int(s) for s in csv_field(config, "seq_devices")})
    except ValueError:
        raise ConfigError("seq_devices", f"must be ints, got {config.seq_devices!r}") from None
    if values[0] < 1:
        raise ConfigError("seq_devices", f"must be ints >= 1, got {config.seq_devices!r}")
    return values


def _seq_devices(config: Any, kind: str) -> list[int]:
    values = seq_devices(config)
    if values != [1] and kind != "kernel":
        raise ConfigError("seq_devices", f"meshes are swept for kind 'kernel', not {kind!r}")
    if values[-1] > jax.local_device_count():
        raise ConfigError(
            "seq_devices",
            f"{values[-1]} devices asked, {jax.local_device_count()} on this host (the sweep "
            "measures one host; train across hosts)",
        )
    return values


def _tasks(config: Any, seq_len: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The task grid of a train_eval config at one length: (values, as written) per
    combination of TASK_AXES values, each an int or `L/k` (the length over k:
    `--config.num_pairs=L/16` gives Zoology's (64, 4), (128, 8), (256, 16))."""
    for section, names in (("train", ("num_steps", "model", "options")), ("data", ("dataset",))):
        for name in names:
            if name not in field(config, section):
                raise ConfigError(f"{section}.{name}", "missing field")
    int_field(config.train, "num_steps")
    from experiments import datasets

    try:
        datasets.builder_class(config.data.dataset)
    except ValueError as e:
        raise ConfigError("data.dataset", str(e)) from None
    tasks: list[tuple[dict[str, Any], dict[str, str]]] = [({}, {})]
    for axis in (a for a in TASK_AXES if a in config):
        try:
            specs = {spec: _per_length(spec, seq_len) for spec in csv_field(config, axis)}
        except (ValueError, ZeroDivisionError):
            raise ConfigError(axis, f"must be ints or L/k, got {config[axis]!r}") from None
        unique: dict[int, str] = {}
        for spec, value in specs.items():
            unique.setdefault(value, spec)  # the first spec of a value names it
        tasks = [
            ({**t, axis: v}, {**n, axis: spec}) for t, n in tasks for v, spec in unique.items()
        ]
    return tasks


def _per_length(value: str, seq_len: int) -> int:
    """An int, or `L/k`: the length over k."""
    if value.startswith("L/"):
        return seq_len // int(value[2:])
    return int(value)


def _numbers(config: Any, name: str, kind: type, minimum: float) -> list[Any]:
    """A comma-separated axis of numbers (`--config.seeds=0,1,2`), each > minimum (seeds:
    >= 0), in the given order without repeats."""
    try:
        values = list(dict.fromkeys(kind(v) for v in csv_field(config, name)))
    except ValueError:
        raise ConfigError(name, f"must be {kind.__name__}s, got {config[name]!r}") from None
    low = [v for v in values if v < minimum or (kind is float and v == minimum)]
    if low:
        raise ConfigError(name, f"{low[0]!r} is out of range ({'>' if kind is float else '>='} "
                                f"{minimum:g})")  # fmt: skip
    return values


# train.* fields that a cell sets itself (the config must not: it has its own axes for them),
# and those that do not change its result: left out of the `training` setting that every row
# of a workdir shares (train.model is in it: a cell's model is built from it).
PER_CELL_TRAINING = ("dataset", "seed", "learning_rate", "batch_size")
IGNORED_TRAINING = ("options", "data_dir", "mesh", "log_every", "checkpoint_every", "keep")


def training_fields(train: Any) -> dict[str, Any]:
    """The train_eval setting's training fields (configs/train.py's less IGNORED_TRAINING);
    ConfigError for a PER_CELL_TRAINING field, which the sweep's own axes set."""
    for name in PER_CELL_TRAINING:
        if name in train:
            axis = {"seed": "seeds", "learning_rate": "learning_rates", "batch_size": "batch"}
            raise ConfigError(
                f"train.{name}", f"is set per cell (--config.{axis.get(name, 'data')}); remove it"
            )
    fields = {k: v for k, v in train.to_dict().items() if k not in IGNORED_TRAINING}
    budget, width = fields.get("match_params", 0), fields.get("match_field", "head_dim")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError("train.match_params", f"must be an int >= 0, got {budget!r}")
    if width not in MATCH_FIELDS:
        raise ConfigError("train.match_field", f"must be one of {MATCH_FIELDS}, got {width!r}")
    if not budget:  # no budget (added later: older rows lack them)
        for name in ("match_params", "match_field"):
            fields.pop(name, None)
    return fields


def _buildable(config: Any, tasks_at: dict[int, list]) -> dict[int, list]:
    """The tasks whose dataset can be built at each length (e.g. MQAR needs 4N <= L: the
    others are left out); a length where none can raises ConfigError with the dataset's reason."""
    from experiments import datasets

    kept = {}
    for T, tasks in tasks_at.items():
        kept[T], reasons = [], []
        for task, spec in tasks:
            fields = {**config.data.to_dict(), **task, "seq_len": T}
            try:
                datasets.config_for(fields.pop("dataset"), **fields).check()
                kept[T].append((task, spec))
            except ValueError as e:
                reasons.append(str(e))
        if not kept[T]:
            raise ConfigError("lengths", f"no cell's dataset can be built at L={T} "
                              f"({'; '.join(dict.fromkeys(reasons))})")  # fmt: skip
    return kept
