"""The tiled engine behind `blockwise` (and the sparse variants): schedule, empty rows, memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv

from attention_variants.common import layout, softmax_attention
from attention_variants.masks import Causal, Mask
from attention_variants.tiled import BlockSizes, make_schedule, tiled_attention


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
