"""The registry: names, lookup errors, eager option validation, families, implementation table."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv

import attention_variants as av
from attention_variants import registry
from attention_variants.families import LinearState, MaskedSoftmax
from attention_variants.masks import Mask
from attention_variants.registry import register


def test_canonical_variants_are_registered():
    assert {"dense", "xla", "blockwise"} <= set(av.names())
    assert list(av.names()) == sorted(av.names())


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown attention variant 'flashy'") as err:
        av.get("flashy")
    for name in av.names():
        assert name in str(err.value)


def test_unknown_option_is_a_type_error_listing_accepted_ones():
    accepted = "accepted options: bias, block_k, block_q, implementation, softcap"
    with pytest.raises(TypeError, match=f"'blockwise'.*blok_q.*{accepted}"):
        av.get("blockwise", blok_q=64)
    with pytest.raises(TypeError, match="accepted options: bias, implementation, softcap$"):
        av.get("dense", window=3)


@pytest.mark.parametrize("value", [0, -8, 2.5, "64"])
def test_bad_option_values_fail_at_get_time(value):
    with pytest.raises(ValueError, match="block_q"):
        av.get("blockwise", block_q=value)


def test_bad_option_values_fail_when_calling_the_unbound_kernel():
    q, k, v = random_qkv(0)
    with pytest.raises(ValueError, match="chunk"):
        av.spec("linear").fn(q, k, v, chunk=0)


def test_unknown_implementation_lists_the_known_ones():
    with pytest.raises(ValueError, match="implementation 'triton'.*auto, cudnn, xla"):
        av.get("xla", implementation="triton")


def test_get_binds_options():
    fn = av.get("blockwise", block_q=32)
    defaults = av.spec("blockwise").defaults
    assert fn.keywords == {"block_q": 32, "block_k": defaults["block_k"], "implementation": "auto",
                           "bias": None, "softcap": None}  # fmt: skip


def test_spec_carries_metadata():
    spec = av.spec("blockwise")
    assert spec.exact and spec.long_context and spec.family == "masked_softmax"
    assert spec.flops(1, 1024, 1024, 8, 64, causal=True) == 4 * 8 * 64 * 1024 * 1024 / 2
    assert spec.flops(1, 1024, 1024, 8, 64, causal=False) == 4 * 8 * 64 * 1024 * 1024
    assert not av.spec("dense").long_context and not av.spec("linear").exact
    assert av.decoder("linear").kind == "recurrent" and av.decoder("blockwise").kind == "kv"


def test_auto_picks_per_backend_and_explicit_requests_name_what_is_missing():
    q, k, v = random_qkv(1)
    spec = av.spec("xla")
    assert spec.choose("auto", q, k, v)[0] == "xla"  # cuDNN is GPU only, and bf16/fp16
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    seg = jnp.zeros((2, 37), jnp.int32)
    assert "float32" in spec.implementations["cudnn"].supports(q, k, v)
    assert "segment_ids" in spec.implementations["cudnn"].supports(*bf16, segment_ids=seg)
    if jax.default_backend() == "cpu":  # the backend is named first
        with pytest.raises(NotImplementedError, match="'cudnn' does not support the 'cpu'"):
            spec.choose("cudnn", q, k, v)


@dataclasses.dataclass(frozen=True)
class Dilated(Mask):
    """A toy declared mask: causal keys at even distance."""

    shift_invariant = True

    @property
    def reach(self):
        return None, 0

    def visible(self, q_pos, k_pos, doc_len=None):
        return (k_pos <= q_pos) & ((q_pos - k_pos) % 2 == 0)

    def pairs(self, T, S):
        return sum(i // 2 + 1 for i in range(T))


def _registered(name, family, declaration):
    register(name, family=family, test_options=({"block_q": 8},))(declaration)
    return av.spec(name)


def test_a_declared_mask_gets_a_kernel_reference_and_flops():
    def dilated(*, causal, stride=2):
        return Dilated() if causal else Mask()

    try:
        spec = _registered("toy_dilated", MaskedSoftmax(), dilated)
        q, k, v = random_qkv(2, T=30)
        out = av.get("toy_dilated", block_q=8, block_k=8)(q, k, v)
        np.testing.assert_allclose(out, spec.reference(q, k, v), rtol=1e-5, atol=1e-5)
        vis = np.array([[j <= i and (i - j) % 2 == 0 for j in range(30)] for i in range(30)])
        ref = av.get("dense")(q, k, v)  # not equal: the toy mask hides odd distances
        assert not np.allclose(out, ref)
        np.testing.assert_array_equal(spec.mask(causal=True).dense(30, 30), vis)
        assert spec.flops(1, 30, 30, 1, 1) == 4 * vis.sum()
        assert set(spec.defaults) == {
            "stride",
            "block_q",
            "block_k",
            "implementation",
            "bias",
            "softcap",
        }  # the score modifiers of every masked softmax
        with pytest.raises(ValueError, match="already registered"):
            _registered("toy_dilated", MaskedSoftmax(), dilated)
    finally:
        registry._REGISTRY.pop("toy_dilated", None)


def test_a_declared_feature_map_gets_a_kernel_reference_and_a_decode_step():
    def relu_features(q, k, *, scale=None, eps=1e-3):
        return (
            jax.nn.relu(q.astype(jnp.float32)) + eps,
            jax.nn.relu(k.astype(jnp.float32)) + eps,
            None,
        )

    try:
        register("toy_relu", family=LinearState(num_features=lambda H, eps=1e-3: H))(relu_features)
        spec = av.spec("toy_relu")
        q, k, v = random_qkv(3, B=1, T=20, N=2, K=1)
        out = av.get("toy_relu", chunk=8)(q, k, v)
        np.testing.assert_allclose(out, spec.reference(q, k, v), rtol=1e-5, atol=1e-5)
        decoder = av.decoder("toy_relu", chunk=8)
        state = decoder.init(1, 20, 1, 16)
        for t in range(20):
            step, state = decoder.extend(
                state, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], t
            )
            np.testing.assert_allclose(step[:, 0], out[:, t], rtol=1e-5, atol=1e-5)
    finally:
        registry._REGISTRY.pop("toy_relu", None)


# --- accelerator rows: which path runs, and what each refuses -----------------------------------


def test_auto_runs_the_portable_engines_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU's choice")
    q, k, v = random_qkv(40, T=256)
    for name in av.names():
        want = "xla" if name == "xla" else "jax"
        assert av.spec(name).choose("auto", q, k, v)[0] == want, name


def test_auto_prefers_splash_on_tpu_and_falls_back_for_what_it_cannot_serve(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    spec = av.spec("sliding_window")
    q, k, v = random_qkv(41, T=256)
    assert spec.choose("auto", q, k, v, window=64)[0] == "splash"
    assert spec.choose("auto", q, k, v, window=64, return_lse=True)[0] == "jax"
    assert spec.choose("auto", *random_qkv(41, T=100), window=64)[0] == "jax"  # T % 128
    seg = jnp.zeros((2, 256), jnp.int32)
    assert av.spec("fixed").choose("auto", q, k, v, segment_ids=seg)[0] == "jax"
    assert av.spec("blockwise").choose("auto", q, k, v, segment_ids=seg)[0] == "splash"


@pytest.mark.parametrize(
    "name,implementation,call,missing",
    [
        ("blockwise", "splash", dict(return_lse=True), "return_lse"),
        ("blockwise", "splash", dict(T=100), "T=100 (splash needs a multiple of 128)"),
        ("blockwise", "splash", dict(q_offset=3), "q_offset (decoding)"),
        ("blockwise", "splash", dict(queries=200), "T=200 != S=256 (cross attention)"),
        ("fixed", "splash", dict(segments=True), "segment_ids with the Fixed pattern"),
        ("blockwise", "cudnn", dict(dtype=jnp.float32), "float32 inputs"),
        ("blockwise", "cudnn", dict(segments=True), "segment_ids (cudnn's public API has none)"),
        ("blockwise", "tokamax", dict(segments=True, return_lse=True), "return_lse"),
        ("blockwise", "cudnn", dict(H=264), "head dim H=264"),
        ("sliding_window", "cudnn", dict(causal=False, window=(8, 4)), "a window reaching 4 keys"),
        ("bigbird", "cudnn", {}, "the BigBird pattern"),
        ("fixed", "tokamax", {}, "the Fixed pattern"),
    ],
)
def test_an_explicit_path_names_what_it_cannot_serve(name, implementation, call, missing):
    """`supports` names the feature; an explicit request raises it, or first the backend where
    the path does not run (cuDNN and tokamax on a CPU)."""
    shape = dict(T=call.pop("T", 256), H=call.pop("H", 16), dtype=call.pop("dtype", jnp.bfloat16))
    q, k, v = random_qkv(42, **shape)
    q = q[:, : call.pop("queries", q.shape[1])]
    if call.pop("segments", False):
        call["segment_ids"] = jnp.zeros(q.shape[:2], jnp.int32)
    window = {"window": call.pop("window")} if "window" in call else {}
    spec, impl = av.spec(name), av.spec(name).implementations[implementation]
    options = {n: x for n, x in spec.options(**window).items() if n != "implementation"}
    assert missing in impl.supports(q, k, v, **call, **options)
    backend = jax.default_backend()
    expected = missing if backend in impl.backends else f"the '{backend}' backend (it runs on"
    with pytest.raises(NotImplementedError, match=f"'{implementation}' does not support") as e:
        av.get(name, implementation=implementation, **window)(q, k, v, **call)
    assert expected in str(e.value)


@pytest.mark.parametrize("implementation", ["cudnn", "tokamax"])
@pytest.mark.parametrize(
    "name,opts,causal,flags",
    [  # (is_causal, local_window_size) from the masks' definitions: Window(left, right)
        ("blockwise", {}, True, (True, None)),
        ("blockwise", {}, False, (False, None)),
        ("sliding_window", {"window": 9}, True, (True, (8, 0))),
        ("sliding_window", {"window": 9}, False, (True, (8, 0))),  # W keys back: causal anyway
        ("sliding_window", {"window": (7, 3)}, True, (True, (7, 0))),
        ("sliding_window", {"window": (7, 3)}, False, (False, (7, 3))),
    ],
)
def test_fused_paths_hand_the_variants_mask_to_the_library(
    monkeypatch, implementation, name, opts, causal, flags
):
    """The GPU rows' library calls: the flags they pass (a cuDNN window always with the causal
    flag), and their outputs through the libraries' own XLA paths on this machine."""
    import tokamax

    from attention_variants import accelerators

    passed = []

    def recording(library):
        def call(q, k, v, *, is_causal, local_window_size, implementation, **kw):
            passed.append((is_causal, local_window_size))
            xla = "xla" if implementation == "cudnn" else ("xla",)
            return library(q, k, v, is_causal=is_causal, local_window_size=local_window_size,
                           implementation=xla, **kw)  # fmt: skip

        return call

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording(jax.nn.dot_product_attention))
    monkeypatch.setattr(tokamax, "dot_product_attention", recording(tokamax.dot_product_attention))
    q, k, v = random_qkv(43, T=48, N=4, K=2)
    spec = av.spec(name)
    options = {n: x for n, x in spec.options(**opts).items() if n != "implementation"}
    impl = spec.implementations[implementation]
    missing = impl.supports(*(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=causal, **options)
    if flags[1] is not None and not flags[0] and implementation == "cudnn":
        assert "reaching 3 keys ahead" in missing  # never handed to cuDNN without the flag
        return
    assert missing is None
    out = impl.fn(q, k, v, causal=causal, scale=0.3, **options)
    assert passed == [flags]
    assert accelerators.KERNELS[implementation] in ("cudnn", ("mosaic", "triton"))
    want = spec.bound_reference(**opts)(q, k, v, causal=causal, scale=0.3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,opts,causal",
    [
        ("blockwise", {}, True),
        ("blockwise", {}, False),
        ("sliding_window", {"window": 9}, True),
        ("sliding_window", {"window": (7, 3)}, False),
    ],
)
def test_tokamax_serves_packed_rows_as_key_ranges(monkeypatch, name, opts, causal):
    """Packed rows on tokamax: each query's document (cut to its window) as a key range of
    tokamax's mask, through tokamax's XLA kernel here, against the variant's reference with the
    segment ids; cuDNN still refuses them."""
    from attention_variants import accelerators

    monkeypatch.setattr(accelerators, "KERNELS", {**accelerators.KERNELS, "tokamax": ("xla",)})
    q, k, v = random_qkv(45, T=48, N=4, K=2)
    ids = jnp.array([[0] * 5 + [1] * 30 + [2] * 13, [3] * 20 + [0] * 28], jnp.int32)
    spec = av.spec(name)
    options = {n: x for n, x in spec.options(**opts).items() if n != "implementation"}
    call = dict(causal=causal, segment_ids=ids, **options)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    tokamax = spec.implementations["tokamax"]
    assert "before Hopper" in tokamax.supports(*bf16, **call)  # Triton there: a dense mask
    monkeypatch.setattr(accelerators, "_hopper_or_later", lambda: True)
    assert tokamax.supports(*bf16, **call) is None
    assert "float32" in tokamax.supports(q, k, v, **call)
    assert "segment_ids" in spec.implementations["cudnn"].supports(*bf16, **call)
    out = spec.implementations["tokamax"].fn(q, k, v, scale=0.3, **call)
    want = spec.bound_reference(**opts)(q, k, v, causal=causal, segment_ids=ids, scale=0.3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_key_ranges_are_the_documents_cut_to_the_window():
    from attention_variants.accelerators import key_ranges

    ids = jnp.array([[7, 7, 7, 2, 2, 9, 9, 9, 9]])
    start, end = key_ranges(ids, is_causal=False, window=None)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5]]
    assert end.tolist() == [[3, 3, 3, 5, 5, 9, 9, 9, 9]]
    start, end = key_ranges(ids, is_causal=True, window=(1, 0))
    assert start.tolist() == [[0, 0, 1, 3, 3, 5, 5, 6, 7]] and end is None
    start, end = key_ranges(ids, is_causal=False, window=(1, 2))
    assert start.tolist() == [[0, 0, 1, 3, 3, 5, 5, 6, 7]]
    assert end.tolist() == [[3, 3, 3, 5, 5, 8, 9, 9, 9]]


def test_auto_times_measured_rows_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(registry, "_FASTEST", {})
    traced = []

    def fast(q, k, v, **call):
        traced.append("fast")
        return av.get("blockwise")(q, k, v, **call)

    def slow(q, k, v, **call):
        out = av.get("blockwise")(q, k, v, **call)
        return jax.lax.fori_loop(0, 30, lambda i, o: av.get("dense")(o, k, v, **call), out)

    spec = dataclasses.replace(
        av.spec("blockwise"),
        implementations={
            "slow": registry.Implementation(slow, measured=True),
            "fast": registry.Implementation(fast, measured=True),
            "jax": av.spec("blockwise").implementations["jax"],
        },
    )
    q, k, v = random_qkv(44, B=1, T=128, N=2, K=2, H=16)
    assert spec.choose("auto", q, k, v, causal=True)[0] == "fast"
    assert traced == ["fast"]  # timed once (one trace of its timing step)
    assert spec.choose("auto", q, k, v, causal=True)[0] == "fast"
    assert traced == ["fast"], "a second call of the same signature timed again"
    # Under jit (tracers), for a new signature: timed eagerly on stand-ins, chosen the same.
    jax.jit(lambda q: spec.choose("auto", q, k, v, causal=False)[1].fn(q, k, v))(q)
    assert traced.count("fast") == 3  # the timing step's trace, then the jitted call's


def test_auto_leaves_out_a_measured_row_that_fails_and_falls_back(monkeypatch):
    monkeypatch.setattr(registry, "_FASTEST", {})

    def refuses(q, k, v, **call):
        raise ValueError("the library refuses these shapes")

    jax_row = av.spec("blockwise").implementations["jax"]
    rows = {"a": registry.Implementation(refuses, measured=True), "jax": jax_row}
    q, k, v = random_qkv(45, B=1, T=32)
    with_rival = {**rows, "b": registry.Implementation(jax_row.fn, measured=True)}
    assert dataclasses.replace(av.spec("blockwise"), implementations=with_rival).choose(
        "auto", q, k, v)[0] == "b"  # fmt: skip
    rows["b"] = registry.Implementation(refuses, measured=True)
    registry._FASTEST.clear()  # the same rivals' names: forget the first choice
    assert dataclasses.replace(av.spec("blockwise"), implementations=rows).choose(
        "auto", q, k, v)[0] == "jax"  # fmt: skip


def test_auto_lets_an_error_that_is_not_a_refusal_propagate(monkeypatch):
    """Out of memory in a rival's trial run is not "cannot serve": it is raised, not hidden by
    quietly running another implementation."""
    monkeypatch.setattr(registry, "_FASTEST", {})

    def out_of_memory(q, k, v, **call):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB")

    jax_row = av.spec("blockwise").implementations["jax"]
    rows = {"a": registry.Implementation(out_of_memory, measured=True),
            "b": registry.Implementation(jax_row.fn, measured=True), "jax": jax_row}  # fmt: skip
    q, k, v = random_qkv(46, B=1, T=32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        dataclasses.replace(av.spec("blockwise"), implementations=rows).choose("auto", q, k, v)
    assert registry.cannot_serve(jax.errors.JaxRuntimeError("UNIMPLEMENTED: no such kernel"))


def test_every_process_of_a_job_takes_process_0s_choice(monkeypatch):
    """Each process times the rivals itself; a job of several runs process 0's choice on all
    (here the broadcast is faked: process 0 picked "b", this process timed "a" faster)."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(registry, "_FASTEST", {})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    names = [None, "a", "b"]  # registry.agreed: None, then the measured rivals sorted
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: names.index("b"))
    jax_row = av.spec("blockwise").implementations["jax"]

    def slow(q, k, v, **call):
        out = jax_row.fn(q, k, v, **call)
        return jax.lax.fori_loop(0, 20, lambda i, o: av.get("dense")(o, k, v, **call), out)

    rows = {"a": registry.Implementation(jax_row.fn, measured=True),
            "b": registry.Implementation(slow, measured=True), "jax": jax_row}  # fmt: skip
    q, k, v = random_qkv(47, B=1, T=64)
    spec = dataclasses.replace(av.spec("blockwise"), implementations=rows)
    assert spec.choose("auto", q, k, v)[0] == "b"


@pytest.mark.parametrize(
    "name, opts, tile",
    [("fixed", {"summary": 64}, 64), ("bigbird", {}, 128), ("sliding_window", {"window": 300}, 99)],
)
def test_splash_reads_each_block_of_a_pattern_as_the_dense_mask_has_it(name, opts, tile):
    """The splash mask of a pattern (answered per tile from the mask's O(1) tile answers where
    a tile is empty or full) equals the materialised mask on every block splash reads."""
    from attention_variants.accelerators import _Pattern

    spec = av.spec(name)
    options = {n: x for n, x in spec.options(**opts).items() if n != "implementation"}
    T, S = 384, 384
    m = spec.mask(causal=True, **options).sized(T, S)
    pattern, dense = _Pattern(m, (T, S)), m.dense(T, S)
    kinds = set()
    for i in range(0, T, tile):
        for j in range(0, S, tile):
            block = pattern[slice(i, i + tile), slice(j, j + tile)]
            np.testing.assert_array_equal(block, dense[i : i + tile, j : j + tile])
            kinds.add("empty" if not block.any() else "full" if block.all() else "partial")
    assert kinds == {"empty", "full", "partial"}, kinds  # each of the answers was taken
    np.testing.assert_array_equal(pattern[slice(0, T, 7), slice(5, 300)], dense[::7, 5:300])
