"""`moba` against MoBA's brute-force reference (`moba_attn_varlen_naive`), transcribed here step
by step in jnp (per document and head: block means, gates, the own and future blocks forced,
top-k, a [T, S] mask, softmax), forward and gradients; what its engine schedules; its cache."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
from attention_variants import selection

F32 = dict(rtol=2e-5, atol=2e-5)


def moba_naive(q, k, v, cu_seqlens, block, top_k):
    """q [S, N, H], k, v [S, N, H] (K/V heads already repeated), documents at cu_seqlens."""
    out = []
    for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        qd, kd, vd = q[lo:hi], k[lo:hi], v[lo:hi]
        L, blocks = hi - lo, math.ceil((hi - lo) / block)
        means = jnp.stack([kd[i * block : min(L, (i + 1) * block)].mean(0) for i in range(blocks)])
        gate = jnp.einsum("shd,nhd->hsn", qd, means)  # [heads, L, blocks]
        for i in range(blocks):  # the blocks a query cannot pick, and its own it must
            gate = gate.at[:, : (i + 1) * block, i].set(-jnp.inf)
            gate = gate.at[:, i * block : (i + 1) * block, i].set(jnp.inf)
        values, index = jax.lax.top_k(gate, min(top_k, blocks))
        need = gate >= values.min(-1, keepdims=True)
        need = need & jax.nn.one_hot(index, blocks, dtype=bool).any(-2)
        mask = jnp.repeat(need, block, axis=-1)[:, :, :L] & jnp.tril(jnp.ones((L, L), bool))
        mask = jax.lax.stop_gradient(mask)
        scores = jnp.einsum("xhd,yhd->hxy", qd, kd) / math.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        out.append(jnp.einsum("hxy,yhd->xhd", p, vd))
    return jnp.concatenate(out)


def naive_rows(q, k, v, lengths, block, top_k):
    """moba_naive per row of a batch, each row packing documents of `lengths`."""
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    return jnp.stack([moba_naive(*x, cu, block, top_k) for x in zip(q, k, v, strict=True)])


def inputs(T, N=4, K=2, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, T, N, H)),
            *(jax.random.normal(x, (2, T, K, H)) for x in keys[1:]))  # fmt: skip


@pytest.mark.parametrize(
    "lengths,block,top_k",
    [([37], 4, 3),  # T not a multiple of the block, GQA
     ([9, 30, 11], 4, 2),  # packed rows: blocks restart at each document
     ([21], 4, 10),  # top_k beyond the number of blocks: every earlier block
     ([40], 8, 1)],  # the own block only
)  # fmt: skip
def test_moba_equals_the_brute_force_reference(lengths, block, top_k):
    T = sum(lengths)
    q, k, v = inputs(T, seed=T)
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(2, 0))
    call = {} if len(lengths) == 1 else {"segment_ids": ids}
    kernel = av.get("moba", block=block, top_k=top_k, chunk=8)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    ours = functools.partial(kernel, **call)
    theirs = functools.partial(naive_rows, lengths=lengths, block=block, top_k=top_k)
    np.testing.assert_allclose(ours(q, k, v), jax.jit(theirs)(q, k, v), **F32)
    grads = [jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
             for fn in (ours, theirs)]  # fmt: skip
    for a, b, what in zip(*grads, ("dq", "dk", "dv"), strict=True):
        np.testing.assert_allclose(a, b, **F32, err_msg=what)


def test_the_selection_depends_on_the_content():
    """Keys that match a query in one early block: that block is picked, others are not."""
    q, k, v = inputs(64, N=1, K=1)
    k = k.at[:, 8:12].set(q[:, 63:64] * 4.0)  # block 2 (of 16) mirrors the last query
    picked = av.spec("moba").mask  # no mask: content-selected
    assert picked is None
    vis = selection.selected_mask(q, k, selection.Selection(4, 2))
    assert vis[0, 0, 63, 8:12].all() and vis[0, 0, 63, :8].sum() == 0
    out = av.get("moba", block=4, top_k=2)(q, k, v)
    np.testing.assert_allclose(out, jax.jit(naive_rows, static_argnums=(3, 4, 5))(
        q, k, v, (64,), 4, 2), **F32)  # fmt: skip


def test_the_engine_scores_a_fraction_of_what_blockwise_does():
    """T = 4096, blocks of 64, top_k 4: the scored (query, key) products, counted from the
    tile plans each engine runs, are under a fifth of causal blockwise's."""
    from attention_variants.tiled import make_schedule

    T, N, K, block, top_k = 4096, 4, 4, 64, 4
    own = make_schedule(selection.own_block_mask(block), T, T, 64, 64, False, 0).tiles
    picked = selection.tile_count(T, N, K, T, block, top_k) * selection.TILE * block
    moba = N * own * 64 * 64 + picked
    causal = av.spec("blockwise").mask(True)
    blockwise = N * make_schedule(causal, T, T, 512, 512, False, 0).tiles * 512 * 512
    assert moba < blockwise / 5, (moba, blockwise)


@pytest.mark.parametrize("top_k", [2, 1])
def test_the_cache_keeps_each_blocks_key_sum_and_a_step_reads_its_picks(top_k):
    """Token by token (each step gathers its top_k blocks) equals the brute force; the cache
    (max_len 15: the last block is partial) holds each block's key sum."""
    q, k, v = inputs(13, N=4, K=2)
    decoder = av.decoder("moba", block=4, top_k=top_k)
    cache, extend = decoder.init(2, 15, 2, 8), jax.jit(decoder.extend)
    outs = []
    for t in range(13):  # one compilation: the position is traced
        out, cache = extend(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], t)
        outs.append(out)
    naive = jax.jit(naive_rows, static_argnums=(3, 4, 5))(q, k, v, (13,), 4, top_k)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), naive, **F32)
    sums = jnp.pad(k, ((0, 0), (0, 3), (0, 0), (0, 0))).reshape(2, 4, 4, 2, 8).sum(2)
    np.testing.assert_allclose(cache.sums, sums, **F32)
    assert cache.sums.shape == (2, 4, 2, 8)  # ceil(15 / 4) blocks


@pytest.mark.parametrize(
    "options,needle", [({"block": 0}, "block"), ({"top_k": 0}, "top_k"), ({"chunk": -1}, "chunk")]
)
def test_bad_options_are_named(options, needle):
    with pytest.raises(ValueError, match=needle):
        av.get("moba", **options)


def test_what_moba_cannot_serve_is_named():
    q, k, v = inputs(8)
    with pytest.raises(NotImplementedError, match="moba: causal=False"):
        av.get("moba")(q, k, v, causal=False)
    with pytest.raises(NotImplementedError, match="moba: return_lse"):
        av.get("moba")(q, k, v, return_lse=True)
