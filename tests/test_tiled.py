"""The tiled engine behind `blockwise` (and the sparse variants): schedule, empty rows, memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_segments, random_qkv

import attention_variants as av
from attention_variants.common import layout, softmax_attention
from attention_variants.common import visible as common_visible
from attention_variants.masks import Causal, Fixed, Mask, Window
from attention_variants.tiled import (
    BlockSizes,
    attend_tiles,
    block_sizes,
    make_schedule,
    plan,
    steps,
    tiled_attention,
    to_tiles,
)


@dataclasses.dataclass(frozen=True)
class EveryThirdRowBlind(Mask):
    """Causal, but queries at positions divisible by 3 see no key at all."""

    def visible(self, q_pos, k_pos, doc_len=None):
        return (k_pos <= q_pos) & (q_pos % 3 != 0)

    @property
    def reach(self):
        return None, 0


def test_rows_that_see_nothing_return_zeros_with_finite_gradients():
    q, k, v = random_qkv(0, T=30)
    mask = EveryThirdRowBlind()
    blocks = BlockSizes(8, 4)
    out = tiled_attention(q, k, v, mask, layout(q, k), block_sizes=blocks)
    np.testing.assert_array_equal(out[:, ::3], 0.0)
    ref = softmax_attention(q, k, v, visible=mask.dense(30, 30)[None])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    grads = jax.grad(
        loss(lambda *a: tiled_attention(*a, mask, layout(q, k), block_sizes=blocks)), (0, 1, 2)
    )(q, k, v)
    refs = jax.grad(
        loss(lambda *a: softmax_attention(*a, visible=mask.dense(30, 30)[None])), (0, 1, 2)
    )(q, k, v)
    for g, r in zip(grads, refs, strict=True):
        assert bool(jnp.all(jnp.isfinite(g)))
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,block", [(1024, 128), (1000, 128), (96, 32)])
def test_causal_schedule_skips_tiles_above_the_diagonal(T, block):
    sched = make_schedule(Causal(), T, T, block, block, False)
    n = -(-T // block)
    assert sched.tiles == n * (n + 1) // 2  # about half of the n * n tiles
    assert int(sched.full.sum()) == n * (n - 1) // 2  # all but the diagonal skip the mask
    assert sched.q_count.sum() == sched.tiles and sched.q_full.sum() == sched.full.sum()


def test_segmented_schedule_masks_every_tile():
    sched = make_schedule(Causal(), 256, 256, 64, 64, True)
    assert int(sched.full.sum()) == 0


def test_full_mask_visits_every_tile_unmasked():
    sched = make_schedule(Mask(), 256, 192, 64, 64, False)
    assert sched.tiles == 4 * 3 and int(sched.full.sum()) == 12


def temp_bytes(T, fn):
    q, k, v = (jax.ShapeDtypeStruct((1, T, 2, 32), jnp.float32) for _ in range(3))
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_forward_and_backward_memory_grows_linearly():
    def blockwise(q, k, v):
        return tiled_attention(q, k, v, Causal(), layout(q, k), block_sizes=BlockSizes(128, 128))

    small, large = temp_bytes(2048, blockwise), temp_bytes(8192, blockwise)
    assert large < 4.5 * small, (small, large)  # O(T): 4x the length, ~4x the memory
    dense = lambda q, k, v: softmax_attention(q, k, v, visible=Causal().dense(8192, 8192)[None])  # noqa: E731
    assert temp_bytes(8192, dense) > 20 * large  # the materialised scores dwarf it


def test_traced_offset_schedules_every_tile_and_prunes_at_run_time():
    """Decoding under jit: the offset is traced, so the band is checked per tile at run time."""
    sched = make_schedule(Causal(), 8, 256, 8, 64, False, None)
    assert sched.tiles == 4 and int(sched.full.sum()) == 0
    q, k, v = random_qkv(1, T=8, S=256)
    fn = jax.jit(lambda o: tiled_attention(q, k, v, Causal(), layout(q, k, q_offset=o),
                                           block_sizes=BlockSizes(8, 64)))  # fmt: skip
    ref = softmax_attention(q, k, v, visible=Causal().dense(8, 256, q_offset=100)[None])
    np.testing.assert_allclose(fn(jnp.int32(100)), ref, rtol=1e-5, atol=1e-5)


def test_static_offset_shifts_the_schedule():
    sched = make_schedule(Causal(), 64, 256, 64, 64, False, 64)  # queries at 64..127
    assert sched.tiles == 2 and int(sched.full.sum()) == 1


def branches_and_open_loops(fn, *args) -> list[str]:
    """The compiled HLO's `conditional`s and `while` loops without a compile-time trip count
    (XLA annotates the others with known_trip_count): what would cost a device a round trip
    to the host at every iteration."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    lines = [line.strip() for line in text.splitlines()]
    return [
        line[:160]
        for line in lines
        if " conditional(" in line or (" while(" in line and "known_trip_count" not in line)
    ]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("name", [n for n in av.names() if n != "xla"])
def test_compiled_forward_and_backward_have_no_branches_or_open_loops(monkeypatch, name, packed):
    """What a GPU or TPU runs of every variant's engine (tiles or chunks as its first test
    options; compiled here with the accelerators' choices), forward and backward: loops of
    compile-time length and no branches, packed rows included."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = random_qkv(11, B=1, T=48, N=2, K=1, H=8)
    fn = av.get(name, **(av.spec(name).test_options or ({},))[0])
    ids = packed_segments(11, 1, 48) if packed else None
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids=ids))  # noqa: E731
    assert branches_and_open_loops(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == []


def test_decoding_under_jit_has_no_branches_or_open_loops_on_accelerators(monkeypatch):
    """A traced offset (the model's decoding step): every key tile is scheduled and masked;
    on CPU the tiles outside the band are skipped by a branch (free there)."""
    q, k, v = random_qkv(12, B=1, T=1, S=64, N=2, K=1, H=8)
    fn = av.get("blockwise", block_q=16, block_k=16)

    def step(q, k, v, position):  # a new function per backend: jit caches by function
        return fn(q, k, v, q_offset=position)

    assert branches_and_open_loops(step, q, k, v, jnp.int32(40))  # CPU: skips by a branch
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert branches_and_open_loops(lambda *a: step(*a), q, k, v, jnp.int32(40)) == []


def test_the_step_engine_hands_float32_partial_results_to_the_merge():
    """A ring step's output joins the others in float32: rounding it to bfloat16 first (as the
    engine's public output is) would add a rounding error per step."""
    q, k, v = random_qkv(13, B=1, T=32, N=2, K=1, H=8, dtype=jnp.bfloat16)
    st, co_q, co_k = plan(32, 2, 32, 1, Causal(), layout(q, k), BlockSizes(16, 16))
    tiles = to_tiles(q, 16, 2), to_tiles(k, 16, 1), to_tiles(v, 16, 1)
    out, lse = attend_tiles(st, *tiles, co_q, co_k)
    assert out.dtype == lse.dtype == jnp.float32
    rounded = out.astype(jnp.bfloat16).astype(jnp.float32)
    assert not np.array_equal(np.asarray(out), np.asarray(rounded))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize(
    "mask", [Causal(), Window(5, 0), Fixed(8, 2)], ids=["causal", "window", "fixed"]
)
def test_accelerator_steps_of_many_pairs_equal_the_reference(monkeypatch, mask, packed):
    """On GPU and TPU a step runs many tile pairs at once (and sums rows without the column of
    ones); checked here on CPU by taking the accelerator's path."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = random_qkv(14, B=2, T=40, N=4, K=2, H=8)
    ids = packed_segments(14, 2, 40) if packed else None
    lay = layout(q, k, segment_ids=ids, within_document=not mask.shift_invariant)
    st, _, _ = plan(40, 4, 40, 2, mask, lay, BlockSizes(8, 8))
    assert st.parallel and not st.ones_column and st.width(1) > 1
    visible = common_visible(mask, lay)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    tiled = lambda q, k, v: tiled_attention(q, k, v, mask, lay, block_sizes=BlockSizes(8, 8))  # noqa: E731
    ref = lambda q, k, v: softmax_attention(q, k, v, visible=visible)  # noqa: E731
    np.testing.assert_allclose(tiled(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss(tiled), (0, 1, 2))(q, k, v)
    for g, r in zip(grads, jax.grad(loss(ref), (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_steps_never_put_two_pairs_of_one_query_tile_in_a_forward_step():
    sched = make_schedule(Causal(), 256, 256, 32, 32, False)
    pairs = sched.pairs(masked=False)
    packed = steps(pairs, 4, (8, 0), distinct=True)
    real = packed[(packed[..., 0] != 8)]
    assert sorted(map(tuple, real)) == sorted(map(tuple, pairs))  # every pair once
    for step in packed:
        rows = [qi for qi, _ in step if qi != 8]
        assert len(rows) == len(set(rows))
    assert len(packed) <= -(-len(pairs) // 4) + 1  # hardly any padding


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_tile_defaults_per_backend(monkeypatch, backend):
    """CPU keeps the masks' measured preferences; accelerators get tiles their matrix units
    take whole (multiples of 128, or 64 for patterns that prefer 64 or less); sizes given are
    kept on every backend."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    cases = [  # mask, segmented, CPU preference, accelerators'
        (Window(64, 0), False, (64, 64), (64, 64)),
        (Window(16, 0), False, (32, 32), (64, 64)),
        (Fixed(128, 16), False, (128, 16), (128, 64)),
        (Fixed(96, 8), False, (96, 8), (128, 64)),
        (Causal(), False, (512, 512), (512, 512)),
    ]
    for mask, segmented, cpu, accelerator in cases:
        want = cpu if backend == "cpu" else accelerator
        assert dataclasses.astuple(block_sizes(mask, segmented)) == want, mask
        assert dataclasses.astuple(block_sizes(mask, segmented, 16, None))[0] == 16
