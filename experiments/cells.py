"""What one sweep cell measures: a cell kind builds a function and its inputs; the runner in
`experiments/sweep.py` compiles, predicts memory and times it, whatever the kind.

Kinds: `kernel` (one attention call, modes `fwd` and `fwd_bwd`), `train_step` (the
TransformerLM training step: forward, cross-entropy, backward, optax AdamW update),
`train_eval` (experiments/quality.py: a training step timed, then a whole training run and an
evaluation for the row's accuracy) and `decode` (the TransformerLM generating through its
cache: `prefill` of T tokens, `decode` steps after T tokens). A new kind is one builder
function added to `KINDS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import use_abstract_mesh

import attention_variants as av
from experiments.configlib import ConfigError, csv_field, field, float_field, int_field

BACKWARD_FLOPS = 2.5  # convention: backward = 2.5 x forward, so fwd_bwd = 3.5 x forward


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
            out["training"] = {k: dict(v) for k, v in self.training.items()}
        if self.devices > 1:
            out["devices"] = self.devices
        return out

    def key(self) -> str:
        return row_key(self.fields())


# What a workdir's rows must share to be read as one experiment; lengths, variants and modes
# (the axes of the tables) may differ. `device` is added by the runner.
SETTING_FIELDS = ("batch", "heads", "kv_heads", "head_dim", "dtype", "causal", "segments")
SETTING_FIELDS += ("model", "training", "device")
KEY_FIELDS = ("variant", "options", "seq_len", "mode", "task", "devices", *SETTING_FIELDS[:-1])


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
    quality: Callable[[], dict[str, Any]] | None = None  # after timing: trains, evaluates
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # more row fields


def document_ids(cell: Cell) -> jax.Array | None:
    """[B, T] int32 ids of the cell's `segments` packed documents (contiguous, lengths T //
    segments or one more), or None for one document per row."""
    if cell.segments == 1:
        return None
    ids = np.arange(cell.seq_len) * cell.segments // cell.seq_len
    return jnp.asarray(np.broadcast_to(ids, (cell.batch, cell.seq_len)), jnp.int32)


def attention_flops(cell: Cell, causal: bool) -> float:
    """Useful forward FLOPs of the cell's attention (the variant's own count): each packed
    document attends within itself, so the count is summed over the documents' lengths."""
    spec = av.spec(cell.variant)
    options = spec.options(**cell.options)
    T, B, N, H = cell.seq_len, cell.batch, cell.heads, cell.head_dim
    lengths = Counter(np.bincount(np.arange(T) * cell.segments // T).tolist())
    return float(
        sum(n * spec.flops(B, L, L, N, H, causal=causal, **options) for L, n in lengths.items())
    )


def build_kernel(cell: Cell, config: Any) -> Built:
    """One attention call on random q, k, v (and the packed rows' segment ids); `fwd_bwd` is
    value_and_grad of a random projection of the output with respect to q, k and v."""
    kernel = av.get(cell.variant, **cell.options)
    B, T, N, K, H = cell.batch, cell.seq_len, cell.heads, cell.kv_heads, cell.head_dim
    dtype = jnp.dtype(cell.dtype)
    kq, kk, kv, kc = jax.random.split(jax.random.key(config.seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), dtype)
    k = jax.random.normal(kk, (B, T, K, H), dtype)
    v = jax.random.normal(kv, (B, T, K, H), dtype)
    args = (q, k, v, document_ids(cell))
    flops = attention_flops(cell, cell.causal)
    mesh, fields = seq_mesh(cell.devices), {}
    if mesh is not None:  # the sequence split over the ring before the call, as in training
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq"))
        args = tuple(None if x is None else jax.device_put(x, split) for x in args)
        fields = {"imbalance": ring_imbalance(cell)}

    def attention(q, k, v, segment_ids):
        with within(mesh):
            return kernel(q, k, v, causal=cell.causal, segment_ids=segment_ids)

    if cell.mode == "fwd":
        return Built(attention, args, flops, B * T, fields=fields)
    cotangent = jax.random.normal(kc, (B, T, N, H), jnp.float32)  # random, never zeros

    def loss(q, k, v, segment_ids, ct):
        return jnp.sum(attention(q, k, v, segment_ids).astype(jnp.float32) * ct)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
    return Built(fn, (*args, cotangent), flops * (1 + BACKWARD_FLOPS), B * T, fields=fields)


def implementation_of(cell: Cell) -> str:
    """The row of the variant's implementation table that the cell's attention calls run
    ("auto" resolved for this backend, the cell's shapes, dtype, packing and mesh)."""
    spec = av.spec(cell.variant)
    options = spec.options(**cell.options)
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
    """Whether the variant shards over a mesh axis (it has an `axis` option, as `ring`)."""
    return "axis" in av.spec(name).defaults


def seq_mesh(devices: int) -> jax.sharding.Mesh | None:
    """A mesh of this process's first `devices` devices on one `seq` axis (None for 1: no
    mesh). The sweep measures one host: its timing decisions are its own."""
    if devices == 1:
        return None
    return jax.sharding.Mesh(np.array(jax.local_devices()[:devices]), ("seq",))


def ring_imbalance(cell: Cell) -> float:
    """Causal work of the busiest device over the mean (tiles the ring's schedules run)."""
    from attention_variants import ring
    from attention_variants.tiled import BlockSizes

    options = av.spec(cell.variant).options(**cell.options)
    tiles = BlockSizes(options["block_q"], options["block_k"])
    work = ring.tile_work(cell.seq_len, cell.devices, layout=options["layout"],
                          causal=cell.causal, block_sizes=tiles)  # fmt: skip
    return round(float(work.max() / work.mean()), 4)


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


def build_train_step(cell: Cell, config: Any) -> Built:
    """One TransformerLM training step on random tokens (packed as the cell says): forward,
    next-token cross-entropy, backward and an AdamW update. Nothing is donated, so memory
    counts old and new state."""
    import optax

    from transformer import next_token_loss

    cfg, model = cell_model(cell, cell.seq_len)
    B, T = cell.batch, cell.seq_len
    tokens = jax.random.randint(jax.random.key(config.seed), (B, T), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(config.seed + 1), tokens)["params"]
    optimizer = optax.adamw(config.learning_rate)
    opt_state = jax.jit(optimizer.init)(params)

    def step(params, opt_state, tokens, segment_ids):
        def loss_fn(params):
            logits = model.apply({"params": params}, tokens, segment_ids)
            return next_token_loss(logits, tokens, segment_ids)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    flops = train_step_flops(cell, params, cfg.num_layers, cfg.tie_embeddings)
    return Built(step, (params, opt_state, tokens, document_ids(cell)), flops, B * T)


def train_step_flops(cell: Cell, params: Any, layers: int, tied: bool) -> float:
    """Useful FLOPs of a training step: 6 x (matmul weights) x tokens for the projections,
    MLP and logits (Kaplan et al. 2020), plus each layer's attention at 3.5 x its forward.
    Matmul weights: params with two or more axes except lookup tables (positions, and the
    input embedding when the output layer is untied)."""
    attention = attention_flops(cell, causal=True) * (1 + BACKWARD_FLOPS) * layers
    return 6.0 * matmul_weights(params, tied) * cell.batch * cell.seq_len + attention


def matmul_weights(params: Any, tied: bool) -> int:
    """Parameters used in matmuls: those with two or more axes except lookup tables."""
    lookups = ("position_embed",) if tied else ("position_embed", "embed")
    weights = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if x.ndim >= 2 and not any(n in lookups for n in names):
            weights += x.size
    return weights


DECODE_STEPS = 16  # single-token steps per timed decode call (a lax.scan, as in generate)


def build_decode(cell: Cell, config: Any) -> Built:
    """`prefill`: the model reads T random tokens into an empty cache in one call (logits at
    the last position only). `decode`: DECODE_STEPS greedy single-token steps in one lax.scan
    (the cache updated in place, as `transformer.generate` does) from position T, so each step
    attends to T + i cached tokens; the cache's contents do not change the work, so it starts
    empty at position T rather than after a prefill. Rows carry `cache_bytes` (the cache of
    the whole model, every layer) and `decode_steps` (time per token = time / steps)."""
    steps = DECODE_STEPS if cell.mode == "decode" else 0
    B, T = cell.batch, cell.seq_len
    cfg, model = cell_model(cell, T + steps)
    key = jax.random.key(config.seed)
    tokens = jax.random.randint(key, (B, T), 0, cfg.vocab_size)
    params = jax.jit(model.init)(key, tokens[:, :1])["params"]
    empty = jnp.zeros((B, T + steps), jnp.int32)
    cache = jax.jit(lambda: model.init(key, empty, decode=True)["cache"])()

    def extend(params, cache, tokens, logits_at=None):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, logits_at=logits_at,
            mutable=["cache"],
        )  # fmt: skip
        return logits[:, -1], variables["cache"]

    attention = av.spec(cell.variant).flops
    options = av.spec(cell.variant).options(**cell.options)
    weights = matmul_weights(params, cfg.tie_embeddings)
    N, H = cell.heads, cell.head_dim
    fields = {"cache_bytes": av.cache_bytes(cache), "decode_steps": steps}
    if cell.mode == "prefill":

        def prefill(params, cache, tokens):
            return extend(params, cache, tokens, jnp.full((B, 1), T - 1, jnp.int32))[0]

        # Logits at the last position only: the output layer's V x D weights count once.
        logits_weights = cfg.vocab_size * cfg.width
        flops = 2.0 * (weights - logits_weights) * B * T + 2.0 * logits_weights * B
        flops += cfg.num_layers * attention(B, T, T, N, H, **options)
        return Built(prefill, (params, cache, tokens), flops, B * T, fields=fields)
    cache = {**cache, "position": jnp.int32(T)}

    def decode(params, cache, token):
        def step(carry, _):
            token, cache = carry
            logits, cache = extend(params, cache, token[:, None])
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None

        (token, _), _ = jax.lax.scan(step, (token, cache), None, length=steps)
        return token

    # The last query's visible keys: the variant's count at T + i + 1 less that at T + i (a
    # linear-state step runs as one chunk of one token).
    if "chunk" in options:
        options = {**options, "chunk": 1}
    marginal = sum(
        attention(B, t + 1, t + 1, N, H, **options) - attention(B, t, t, N, H, **options)
        for t in range(T, T + steps)
    )
    flops = 2.0 * weights * B * steps + cfg.num_layers * marginal
    return Built(decode, (params, cache, tokens[:, -1]), flops, B * steps, fields=fields)


KINDS: dict[str, Callable[[Cell, Any], Built]] = {
    "kernel": build_kernel,
    "train_step": build_train_step,
    "train_eval": lambda cell, config: _quality().build_train_eval(cell, config),
    "decode": build_decode,
}
MODES: dict[str, tuple[str, ...]] = {
    "kernel": ("fwd", "fwd_bwd"),
    "train_step": ("train_step",),
    "train_eval": ("train_eval",),
    "decode": ("prefill", "decode"),
}
TASK_AXES = ("num_pairs",)  # train_eval config fields (comma-separated) swept like lengths


def _quality():
    from experiments import quality  # imports the training stack only when a cell needs it

    return quality


# -- planning: a config becomes a list of cells ------------------------------------------------
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


def _variants(config: Any) -> list[str]:
    known = av.names()
    names = csv_field(config, "variants")
    if names == ["all"]:  # mesh-aware variants (ring) only where a mesh is swept
        meshed = seq_devices(config) != [1]
        names = [n for n in known if meshed or not mesh_aware(n)]
    for name in names:
        if name not in known:
            raise ConfigError("variants", f"unknown variant {name!r}; known: {', '.join(known)}")
    if config.get("only_long_context", False):
        names = [n for n in names if av.spec(n).long_context]
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
    merged = {}
    for name in variants:
        try:
            merged[name] = av.spec(name).options(**dict(given.get(name) or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"options.{name}", str(e)) from None
    return merged


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
    model, tasks, training = None, [None], None
    if kind in ("train_step", "train_eval", "decode"):
        model = _model(config)
        if not causal:
            raise ConfigError("causal", f"the TransformerLM is causal: {kind} needs True")
    if kind == "decode" and segments != 1:
        raise ConfigError("segments", "decoding reads one sequence per row: segments must be 1")
    if kind == "train_step":
        float_field(config, "learning_rate")
    if kind == "train_eval":
        tasks = _tasks(config)
        training = {"data": config.data.to_dict(), "train": config.train.to_dict()}
    shape = (batch, heads, kv_heads, head_dim, dtype)
    devices = _seq_devices(config, kind)
    return [
        Cell(
            kind, v, options[v], T, *shape, mode, causal, segments, model, task, training, devices=n
        )  # fmt: skip
        for T in lengths
        for v in variants
        for n in (devices if mesh_aware(v) else [1])
        for task in tasks
        for mode in modes
        if task is None or _fits(config, T, task)
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


def _tasks(config: Any) -> list[dict[str, Any]]:
    """The task grid of a train_eval config: one dict per combination of TASK_AXES values."""
    for section, names in (("train", ("num_steps", "learning_rate")), ("data", ("dataset",))):
        for name in names:
            if name not in field(config, section):
                raise ConfigError(f"{section}.{name}", "missing field")
    int_field(config.train, "num_steps")
    from experiments import datasets

    try:
        datasets.builder_class(config.data.dataset)
    except ValueError as e:
        raise ConfigError("data.dataset", str(e)) from None
    tasks = [{}]
    for axis in (a for a in TASK_AXES if a in config):
        try:
            values = [int(v) for v in csv_field(config, axis)]
        except ValueError:
            raise ConfigError(axis, f"must be ints, got {config[axis]!r}") from None
        tasks = [{**t, axis: v} for t in tasks for v in values]
    return tasks


def _fits(config: Any, seq_len: int, task: dict[str, Any]) -> bool:
    """Whether the task's dataset can be built at this length (e.g. MQAR needs 4N <= L)."""
    from experiments import datasets

    fields = {**config.data.to_dict(), **task, "seq_len": seq_len}
    dataset_config = datasets.config_for(fields.pop("dataset"), **fields)
    try:
        dataset_config.check()
    except ValueError:
        return False
    return True
