"""Families: a variant declares what it is, and its kernel, reference and FLOPs derive from it.

* `MaskedSoftmax`: the declaration returns the variant's mask (`masks.Mask`, a predicate on
  positions within the document). Derived: the tiled kernel (`tiled.py`, only tiles the mask
  shows), the reference (plain softmax under the materialised mask), the FLOP count (visible
  pairs), and the mask itself for tests and decoding.
* `LinearState`: the declaration is the feature map phi (q, k -> features). Derived: the chunked
  causal kernel (`chunked.py`), the plain sums over an explicit mask, the recurrent decoding
  step, and the FLOP count of the algorithm.
* `RecurrentState`: the declaration returns the vectors and gates of a decaying or delta-rule
  recurrence (RetNet, GLA, Mamba-2, DeltaNet, Gated DeltaNet). Derived: the chunked kernel
  (`recurrent.py`), the token-by-token reference, the FLOP count, the recurrent decoding state,
  and the checks of the gates, which are call arguments (`Spec.arguments`).

Each family also fills the variant's implementation table ("jax": the portable engine).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention_variants import accelerators, chunked, recurrent, selection
from attention_variants.common import (
    alibi_bias,
    beyond_self_attention,
    check_gates,
    check_inputs,
    check_positive,
    contract,
    default_scale,
    layout,
    masked_scores,
    softmax_attention,
    softmax_flops,
    visible,
)
from attention_variants.decoding import (
    Cache,
    _check_step,
    linear_state_cache,
    masked_softmax_cache,
    selection_cache,
)
from attention_variants.masks import Mask, check_shift
from attention_variants.registry import Implementation
from attention_variants.tiled import BlockSizes, block_sizes, tiled_attention


def keyword_defaults(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword-only parameters of `fn` and their defaults (the variant's options)."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip
    }


def _pick(options: Mapping[str, Any], names) -> dict[str, Any]:
    """The options among `names` (a declaration's own, without tile or chunk sizes)."""
    return {k: v for k, v in options.items() if k in names}


@dataclasses.dataclass(frozen=True)
class MaskedSoftmax:
    """Exact softmax attention under a declared mask: `declaration(*, causal, **options)`, or
    `declaration(**options)` without `causal` for a mask that serves causal calls only (a call
    with causal=False then raises NotImplementedError naming the variant).

    Every variant also takes score modifiers (served by the tiled engine and the reference; the
    other rows of the table serve those of their `Implementation.modifiers` and refuse the
    others, naming them): options `bias="alibi"` (ALiBi, Press
    et al. 2022: -m_h |i - j| added to the scaled scores, m_h = 2^(-8(h+1)/N)) and `softcap=c`
    (Gemma 2: the scaled score s becomes c tanh(s / c), after the bias, before the mask), and
    the call argument `sink_logits` [N] (learned sinks, as gpt-oss: one value-less logit per
    head in every row's softmax denominator).

    tiles: the tile sizes of the "jax" engine (options block_q, block_k); "auto" (default) lets
      the mask pick (`Mask.preferred_tiles`: small tiles for a narrow band, else 512 x 512);
      None: the variant is not tiled (no tile options).
    implementations: optional `fn(kernels) -> {name: Implementation}` replacing the table
      (default: `accelerators.table`, then "jax": the tiled engine); `kernels.tiled` and
      `kernels.reference` are the derived contract functions, `kernels.mask` the mask and
      `kernels.prepare` the call's sized mask and `Layout`.
    """

    tiles: BlockSizes | str | None = "auto"
    implementations: Callable[[Any], Mapping[str, Implementation]] | None = None

    def build(self, name: str, declaration: Callable[..., Mask]) -> dict[str, Any]:
        mask_defaults = keyword_defaults(declaration, skip=("causal",))
        causal_only = "causal" not in inspect.signature(declaration).parameters
        tile_defaults = {}
        if isinstance(self.tiles, BlockSizes):
            tile_defaults = dict(block_q=self.tiles.block_q, block_k=self.tiles.block_k)
        elif self.tiles == "auto":
            tile_defaults = dict(block_q=None, block_k=None)

        def mask(causal: bool = True, **options) -> Mask:
            own = _pick(options, mask_defaults)
            if causal_only and not causal:
                raise NotImplementedError(
                    f"attention variant {name!r} serves causal calls only (its mask declaration "
                    "takes no `causal`): causal=False"
                )
            return check_shift(declaration(**own) if causal_only else
                               declaration(causal=causal, **own))  # fmt: skip

        def check(**options) -> None:
            mask(True, **options)
            if not causal_only:
                mask(False, **options)
            for tile in tile_defaults:  # None: the mask's preferred tiles
                if options.get(tile) is not None:
                    check_positive(**{tile: options[tile]})
            check_modifiers(options["bias"], options["softcap"])

        def prepare(q, k, v, call, options):
            check_inputs(q, k, v)
            check_sinks(q, options.get("sink_logits"))
            m = mask(call["causal"], **options)
            lay = layout(
                q,
                k,
                segment_ids=call["segment_ids"],
                kv_segment_ids=call["kv_segment_ids"],
                q_offset=call["q_offset"],
                within_document=not m.shift_invariant,
            )
            T, S = q.shape[1], k.shape[1]  # a traced offset is taken to be at most S
            positions = T + S if lay.q_offset is None else max(T + lay.q_offset, S)
            return m.sized(positions, S), lay

        @contract
        def reference(q, k, v, call, options):
            """Softmax under the explicit [T, S] mask, float32 statistics."""
            m, lay = prepare(q, k, v, call, options)
            bias = alibi_bias(lay, q.shape[2]) if options.get("bias") == "alibi" else None
            return softmax_attention(
                q, k, v, visible=visible(m, lay), scale=call["scale"],
                return_lse=call["return_lse"], bias=bias, softcap=options.get("softcap"),
                sink_logits=options.get("sink_logits"),
            )  # fmt: skip

        @contract
        def tiled(q, k, v, call, options):
            """Tile by tile: only the tiles the mask shows run (`tiled.py`)."""
            m, lay = prepare(q, k, v, call, options)
            tiles = block_sizes(m, lay.segmented, *(options.get(t) for t in tile_defaults))
            return tiled_attention(
                q, k, v, m, lay, scale=call["scale"], block_sizes=tiles,
                return_lse=call["return_lse"],
                **{n: options.get(n) for n in ("bias", "softcap", "sink_logits")},
            )  # fmt: skip

        def decode_tiles(**options) -> BlockSizes:
            return block_sizes(
                mask(True, **options), False, *(options.get(t) for t in tile_defaults)
            )

        def flops(B, T, S, N, H, *, causal=True, **options) -> float:
            return softmax_flops(B, N, H, mask(causal, **options).pairs(T, S))

        kernels = SimpleNamespace(tiled=tiled, reference=reference, prepare=prepare, mask=mask)
        if self.implementations is None:  # the accelerators' fused kernels, then the engine
            table = {**accelerators.table(kernels), "jax": Implementation(tiled)}
        else:
            table = dict(self.implementations(kernels))
        table = {n: i if i.fn in (tiled, reference) else refusing_modifiers(i)
                 for n, i in table.items()}  # fmt: skip
        return dict(
            family="masked_softmax",
            reference=reference,
            exact=True,
            flops=flops,
            defaults={**mask_defaults, **tile_defaults, **MODIFIERS},
            arguments={"sink_logits": "N"},
            check=check,
            implementations=table,
            mask=mask,
            decode=masked_softmax_cache(
                name, mask, prepare, decode_tiles if tile_defaults else None
            ),
            causal_only=causal_only,
        )


MODIFIERS = dict(bias=None, softcap=None)  # every masked softmax's score modifiers (off)
BIASES = (None, "alibi")


def check_modifiers(bias, softcap) -> None:
    """ValueError naming the option unless `bias` is known and `softcap` None or > 0."""
    if bias not in BIASES:
        raise ValueError(f"bias must be one of {BIASES}, got bias={bias!r}")
    number = isinstance(softcap, int | float) and not isinstance(softcap, bool)
    if softcap is not None and not (number and softcap > 0):
        raise ValueError(f"softcap must be a number > 0 (None: no cap), got softcap={softcap!r}")


def check_sinks(q, sink_logits) -> None:
    """ValueError unless `sink_logits` is None or a float array [N] (q's heads)."""
    if sink_logits is None:
        return
    shape, dtype = getattr(sink_logits, "shape", None), getattr(sink_logits, "dtype", None)
    if shape != (q.shape[2],) or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"sink_logits must be a float array [N] = [{q.shape[2]}] (one per query head), got "
            f"{shape} {dtype}"
        )


def modifiers_used(call_and_options: Mapping[str, Any]) -> dict[str, str]:
    """The score modifiers a call asks for: {name: as written}."""
    used = {n: f"{n}={call_and_options[n]!r}" for n in MODIFIERS if call_and_options.get(n)}
    if call_and_options.get("sink_logits") is not None:
        used["sink_logits"] = "sink_logits"
    return used


def refusing_modifiers(impl: Implementation) -> Implementation:
    """`impl`, refusing calls with the score modifiers it does not serve (`impl.modifiers`;
    the tiled engine and the reference serve them all)."""

    def supports(q, k, v, **kw):
        unserved = [text for n, text in modifiers_used(kw).items() if n not in impl.modifiers]
        if unserved:
            return f"{', '.join(unserved)} (the 'jax' engine serves them)"
        return impl.supports(q, k, v, **kw)

    return dataclasses.replace(impl, supports=supports)


def _not_served(name: str, q, k, call, lse: str = "linear attention has no log-sum-exp") -> None:
    """The NotImplementedError of a family that serves whole rows of self-attention (the linear
    and recurrent ones, block selection) for what it cannot serve, naming the argument (a full
    call of a linear variant takes any keys); `lse` says why there is no log-sum-exp."""
    if call["return_lse"]:
        raise NotImplementedError(f"{name}: return_lse ({lse})")
    beyond = beyond_self_attention(q, k, call)
    if beyond == "kv_segment_ids" or (beyond and call["causal"]):
        hint = "; decode through av.decoder(name)" if beyond.startswith("q_offset") else ""
        raise NotImplementedError(f"{name}: {beyond}{hint}")


@dataclasses.dataclass(frozen=True)
class LinearState:
    """Kernelised attention phi(q).phi(k) from a declared feature map.

    The declaration is `features(q, k, *, scale, **options) -> (qf, kf, log_scale)`: float32
    non-negative features qf [B,T,N,F], kf [B,S,K,F], and optional key log scales [B,S,K]
    (true key features kf * exp(log_scale), see `chunked.py`). num_features(H, **options) -> F
    and map_flops(B, T, S, N, H, **options) (the feature maps' matmuls) feed the FLOP count.
    """

    num_features: Callable[..., int]
    map_flops: Callable[..., float] = lambda *args, **options: 0.0
    chunking: chunked.Chunking = chunked.Chunking()

    def build(self, name: str, declaration: Callable) -> dict[str, Any]:
        feature_defaults = keyword_defaults(declaration, skip=("scale",))

        def features(q, k, scale, options):
            return declaration(q, k, scale=scale, **_pick(options, feature_defaults))

        def check(**options) -> None:
            chunked.Chunking(options["chunk"])
            self.num_features(8, **_pick(options, feature_defaults))

        def linear_state(explicit: bool):
            """The chunked kernel, or (explicit) the plain sums over an explicit [T, S] mask."""

            @contract
            def fn(q, k, v, call, options):
                check_inputs(q, k, v)
                _not_served(name, q, k, call)
                runs = layout(q, k, segment_ids=call["segment_ids"]).q_seg  # documents: run ids
                kw = dict(causal=call["causal"], segment_ids=runs)
                qf, kf, m = features(q, k, call["scale"], options)
                if explicit:
                    out = chunked.linear_attention_reference(qf, kf, v, log_scale=m, **kw)
                else:
                    out = chunked.linear_attention(
                        qf, kf, v, log_scale=m, chunk=options["chunk"], **kw
                    )
                return out.astype(q.dtype)

            return fn

        kernel, reference = linear_state(False), linear_state(True)

        def flops(B, T, S, N, H, *, causal=True, **options) -> float:
            options = {**feature_defaults, "chunk": self.chunking.chunk, **options}
            own = _pick(options, feature_defaults)
            F = self.num_features(H, **own)
            sums = chunked.chunked_flops(
                B, T, S, N, H, causal=causal, features=F, chunk=options["chunk"]
            )
            return self.map_flops(B, T, S, N, H, **own) + sums

        def count(head_dim, options):
            return self.num_features(head_dim, **_pick(options, feature_defaults))

        return dict(
            family="linear_state",
            reference=reference,
            exact=False,
            flops=flops,
            defaults={**feature_defaults, "chunk": self.chunking.chunk},
            check=check,
            implementations={"jax": Implementation(kernel)},
            decode=linear_state_cache(features, count),
        )


@dataclasses.dataclass(frozen=True)
class RecurrentState:
    """Linear attention with a decaying or delta-rule state (`recurrent.py`), causal only.

    The declaration is `prepare(q, k, *, <gates>, **options) -> (q, k, log_decay, beta)`: the
    variant's query and key vectors (normalised, say) and its gates, from the call's gates
    (`gates`, a subset of ("log_decay", "beta"); None when not given) or its own (fixed
    decays). `per_feature`: log_decay is [B, T, N, H] (a decay per key feature), else [B, T, N].
    `delta`: the delta rule writes (beta None means 1). The kernel applies `scale` to q and
    repeats K/V heads to the query heads (each query head carries its own state).
    """

    gates: tuple[str, ...] = ()
    per_feature: bool = False
    delta: bool = False
    chunking: chunked.Chunking = chunked.Chunking()

    def __post_init__(self):
        unknown = set(self.gates) - {"log_decay", "beta"}
        if unknown or (self.per_feature and self.delta) or ("beta" in self.gates) != self.delta:
            raise ValueError(
                f"RecurrentState: gates {self.gates} (per_feature={self.per_feature}, "
                f"delta={self.delta}) is not a served form"
            )

    @property
    def axes(self) -> dict[str, str]:
        """Each gate's axes: log_decay per head (BTN) or per key feature (BTNH), beta BTN."""
        return {g: "BTNH" if g == "log_decay" and self.per_feature else "BTN" for g in self.gates}

    def build(self, name: str, declaration: Callable) -> dict[str, Any]:
        own_defaults = keyword_defaults(declaration, skip=self.gates)

        def inputs(q, k, v, scale, gates, options):
            """The engine's inputs: q (scaled), k, v per query head, log_decay, beta."""
            check_gates(name, q, gates, self.axes)
            q, k, log_decay, beta = declaration(q, k, **gates, **_pick(options, own_defaults))
            G = q.shape[2] // k.shape[2]
            k, v = (jnp.repeat(x, G, axis=2) for x in (k, v))
            return q * default_scale(scale, q.shape[-1]), k, v, log_decay, beta

        def state(explicit: bool):
            """The chunked kernel, or (explicit) the token-by-token recurrence."""

            @contract
            def fn(q, k, v, call, options):
                check_inputs(q, k, v)
                dtype = q.dtype
                gates = {g: options.pop(g, None) for g in self.gates}
                _not_served(name, q, k, call)
                if not call["causal"]:
                    raise NotImplementedError(f"{name}: causal=False (its state runs forward)")
                runs = layout(q, k, segment_ids=call["segment_ids"]).q_seg  # documents: run ids
                q, k, v, log_decay, beta = inputs(q, k, v, call["scale"], gates, options)
                kw = dict(log_decay=log_decay, beta=beta, delta=self.delta, segment_ids=runs)
                if explicit:
                    out, _ = recurrent.recurrence(q, k, v, **kw)
                else:
                    out, _ = recurrent.chunked(q, k, v, chunk=options["chunk"], **kw)
                return out.astype(dtype)

            return fn

        def flops(B, T, S, N, H, *, causal=True, **options) -> float:
            chunk = options.get("chunk", self.chunking.chunk)
            return recurrent.chunked_flops(B, T, N, H, H, chunk=chunk, delta=self.delta)

        def extend(S, q, k, v, position, *, scale=None, **options):
            _check_step(q, k, v)
            if S.shape[1] != q.shape[2]:
                raise ValueError(
                    f"{name}: the state holds {S.shape[1]} heads, the call has N={q.shape[2]} "
                    f"query heads (one state per query head: init(..., num_heads={q.shape[2]}))"
                )
            gates = {g: options.pop(g, None) for g in self.gates}
            q_in, k, v, log_decay, beta = inputs(q, k, v, scale, gates, options)
            kw = dict(log_decay=log_decay, beta=beta, delta=self.delta, chunk=options["chunk"])
            out, S = recurrent.chunked(q_in, k, v, state=S, **kw)
            return out.astype(q.dtype), S

        def init(batch, max_len, kv_heads, head_dim, dtype=jnp.float32, num_heads=None, **_):
            return recurrent.init_state(batch, num_heads or kv_heads, head_dim, head_dim)

        return dict(
            family="recurrent_state",
            reference=state(True),
            exact=False,
            flops=flops,
            defaults={**own_defaults, "chunk": self.chunking.chunk},
            check=lambda **options: chunked.Chunking(options["chunk"]),
            implementations={"jax": Implementation(state(False))},
            decode=Cache(lambda **options: "recurrent", init, extend),
            arguments=self.axes,
            causal_only=True,
        )


@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """Softmax over the key blocks each query selects by content (MoBA; with NSA's compressed
    and window branches, `selection.py`): the declaration returns a `selection.Selection`
    (block size, top_k, forced blocks, scoring, window) from its options.

    Derived: the engine (scores per block, top-k, attention over the selected blocks' keys
    only; NSA's branches), the reference (brute force: every block's score, a dense [T, S]
    mask, plain softmax; NSA's branches dense), the FLOP count (selected pairs plus the
    scores, plus NSA's branches), and a KV cache that keeps each block's key sum (and value
    sum for NSA), so a decoding step scores the cached blocks without re-reading them. Causal
    self-attention only: a non-causal call, return_lse, cross-attention and decoding offsets
    (decode through `av.decoder`) raise NotImplementedError naming them.

    chunk: queries per step of the engine (its working set), an option.
    branches: NSA's gated branches (the declaration's `scoring="compressed"`), whose gates are
      the call argument `branch_gates` [B, T, N, 3] in [0, 1] (None: 1/2 each).
    """

    chunk: int = 128
    branches: bool = False

    def build(self, name: str, declaration: Callable) -> dict[str, Any]:
        own_defaults = keyword_defaults(declaration)
        axes = {"branch_gates": "BTN3"} if self.branches else {}

        def declared(options) -> selection.Selection:
            sel = declaration(**_pick(options, own_defaults))
            if sel.branches != self.branches:
                raise ValueError(f"{name}: its family serves branches={self.branches}, the "
                                 f"declaration gave scoring={sel.scoring!r}")  # fmt: skip
            return sel

        def check(**options) -> None:
            declared(options)
            check_positive(chunk=options["chunk"])

        def served(q, k, v, call, options):
            check_inputs(q, k, v)
            _not_served(name, q, k, call, lse="the engine keeps it to itself")
            if not call["causal"]:
                raise NotImplementedError(f"{name}: causal=False (a query selects earlier blocks)")
            gates = {g: options.pop(g, None) for g in axes}
            check_gates(name, q, gates, axes)
            return gates

        @contract
        def engine(q, k, v, call, options):
            """Gathers each query's selected blocks (`selection.branched_attention`)."""
            gates = served(q, k, v, call, options)
            sel, (B, T, _, H) = declared(options), q.shape
            lay = layout(q, k, segment_ids=call["segment_ids"], within_document=True)
            return selection.branched_attention(
                q, k, v, sel, lay=lay, bl=selection.row_blocks(lay.k_seg, B, T, sel.block),
                scale=default_scale(call["scale"], H), chunk=options["chunk"], **gates,
            )  # fmt: skip

        @contract
        def reference(q, k, v, call, options):
            """Brute force: every block's score, the top-k, a dense mask, plain softmax; NSA's
            compressed branch over every block mean and its window under a dense mask."""
            gates = served(q, k, v, call, options)
            sel, scale = declared(options), default_scale(call["scale"], q.shape[-1])
            runs = layout(q, k, segment_ids=call["segment_ids"]).q_seg
            if runs is None:
                runs = jnp.zeros(q.shape[:2], jnp.int32)

            def attend(vis):  # softmax under vis [B, N, T, S]
                s = masked_scores(q, k, scale=scale)  # [B, K, G, T, S]
                p = jax.nn.softmax(jnp.where(vis.reshape(s.shape), s, -jnp.inf), axis=-1)
                out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32))
                return out.reshape(q.shape)

            selected = attend(selection.selected_mask(q, k, sel, runs, scale))
            if not sel.branches:
                return selected.astype(q.dtype)
            db = selection.dense_blocks(runs, sel.block)
            p = selection.compressed_probabilities(q, k, db, scale)  # [B, N, T, S]
            means = selection.block_mean_of_each_key(db, v)
            means = jnp.repeat(means, q.shape[2] // k.shape[2], axis=2)
            compressed = jnp.einsum("BNTS,BSNH->BTNH", p, means)
            T = q.shape[1]
            back = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
            band = db.same_doc & (back >= 0) & (back < sel.window)  # [B, T, S]
            window = attend(jnp.broadcast_to(band[:, None], (*band.shape[:1], q.shape[2],
                                                             *band.shape[1:])))  # fmt: skip
            out = selection.gated_sum(gates["branch_gates"], compressed, selected, window)
            return out.astype(q.dtype)

        def flops(B, T, S, N, H, *, causal=True, **options) -> float:
            sel = declared({**own_defaults, **options})
            i = S - T + np.arange(T, dtype=np.int64)  # queries at the end of the keys
            earlier = i // sel.block
            pairs = i % sel.block + 1 + np.minimum(sel.top_k - 1, earlier) * sel.block
            total = softmax_flops(B, N, H, float(pairs.sum())) + 2.0 * B * N * H * earlier.sum()
            if sel.branches:  # the compressed branch (its scores again) and the window
                whole = (i + 1) // sel.block
                window = np.minimum(i + 1, sel.window)
                total += softmax_flops(B, N, H, float(whole.sum() + window.sum()))
            return total

        return dict(
            family="block_selection",
            reference=reference,
            exact=False,
            flops=flops,
            defaults={**own_defaults, "chunk": self.chunk},
            check=check,
            implementations={"jax": Implementation(engine)},
            decode=selection_cache(name, declared, axes),
            arguments=axes,
            causal_only=True,
            grouped=self.branches,
        )
