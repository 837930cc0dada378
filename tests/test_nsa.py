"""`nsa` against Native Sparse Attention's definition (Yuan et al. 2025, eqs. 5-12 with
l = d = l' = block and mean pooling for phi), transcribed here query by query in jnp: the
compressed branch over the whole blocks ended by t, the group-summed probabilities, the forced
and top-ranked blocks, the window; forward and gradients, GQA, packed rows, decoding."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av

F32 = dict(rtol=2e-5, atol=2e-5)


def attend(q, keys, values, scale):
    """Softmax attention of q [H] over keys, values [n, H] (n = 0: zeros)."""
    if keys.shape[0] == 0:
        return jnp.zeros_like(q)
    return jax.nn.softmax(keys @ q * scale) @ values


def nsa_naive(q, k, v, gates, cu_seqlens, block, top_k, window, initial, local):
    """q [S, N, H], k, v [S, K, H], gates [S, N, 3], documents at cu_seqlens -> [S, N, H]."""
    N, K, H = q.shape[1], k.shape[1], q.shape[2]
    G, scale = N // K, 1.0 / math.sqrt(H)
    out = []
    for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        for t in range(hi - lo):
            whole = (t + 1) // block  # compressed tokens: whole blocks ending at or before t
            own = t // block
            row = []
            for h in range(K):
                kd, vd = k[lo : lo + t + 1, h], v[lo : lo + t + 1, h]
                kc = jnp.stack([kd[i * block : (i + 1) * block].mean(0) for i in range(whole)]
                               or [jnp.zeros(H)])[:whole]  # fmt: skip
                vc = jnp.stack([vd[i * block : (i + 1) * block].mean(0) for i in range(whole)]
                               or [jnp.zeros(H)])[:whole]  # fmt: skip
                heads = q[lo + t, h * G : (h + 1) * G]  # the group's queries [G, H]
                p = [jax.nn.softmax(kc @ x * scale) if whole else jnp.zeros(0) for x in heads]
                score = jax.lax.stop_gradient(sum(p))  # [whole]: the group's importance
                rank = jnp.where(jnp.arange(whole) < initial, jnp.inf, score)
                rank = jnp.where(jnp.arange(whole) > own - local, jnp.inf, rank)[:own]
                picks = np.argsort(-np.asarray(rank), kind="stable")[: top_k - 1]
                chosen = sorted([*map(int, picks), own])
                keys = np.concatenate([np.arange(b * block, min((b + 1) * block, t + 1))
                                       for b in chosen])  # fmt: skip
                lo_w = max(0, t - window + 1)
                for g, x in enumerate(heads):
                    cmp = vc.T @ p[g] if whole else jnp.zeros(H)
                    slc = attend(x, kd[keys], vd[keys], scale)
                    win = attend(x, kd[lo_w:], vd[lo_w:], scale)
                    a = gates[lo + t, h * G + g]
                    row.append(a[0] * cmp + a[1] * slc + a[2] * win)
            out.append(jnp.stack(row))
    return jnp.stack(out)


def naive_rows(q, k, v, gates, lengths, **options):
    cu = np.concatenate([[0], np.cumsum(lengths)])
    return jnp.stack([nsa_naive(*x, cu, **options) for x in zip(q, k, v, gates, strict=True)])


def inputs(T, N=4, K=2, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, T, N, H))
    k, v = (jax.random.normal(x, (2, T, K, H)) for x in keys[1:3])
    return q, k, v, jax.random.uniform(keys[3], (2, T, N, 3))


@pytest.mark.parametrize(
    "lengths,options",
    [([23], dict(block=4, top_k=3, window=5, initial=1, local=2)),  # GQA, T % block != 0
     ([9, 14], dict(block=4, top_k=4, window=3, initial=1, local=2))],  # packed rows
)  # fmt: skip
def test_nsa_equals_the_papers_definition(lengths, options):
    """Forward on the naive transcription (concrete: its ranking runs in numpy); gradients
    of the engine against the family's dense reference, both on the same random gates."""
    T = sum(lengths)
    q, k, v, gates = inputs(T, seed=T)
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(2, 0))
    call = {} if len(lengths) == 1 else {"segment_ids": ids}
    kernel = functools.partial(av.get("nsa", chunk=8, **options), **call)
    want = naive_rows(q, k, v, gates, lengths, **options)
    np.testing.assert_allclose(kernel(q, k, v, branch_gates=gates), want, **F32)

    reference = functools.partial(av.spec("nsa").bound_reference(**options), **call)
    cot = jax.random.normal(jax.random.key(3), q.shape)

    def loss(fn, q, k, v, gates):
        return jnp.sum(fn(q, k, v, branch_gates=gates) * cot)

    grads = [jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))(q, k, v, gates)
             for fn in (kernel, reference)]  # fmt: skip
    for a, b, what in zip(*grads, ("dq", "dk", "dv", "dgates"), strict=True):
        np.testing.assert_allclose(a, b, **F32, err_msg=what)


def test_a_group_selects_together_and_forced_blocks_are_kept():
    """Keys of block 3 mirror one head's query: with the heads of its group (GQA) the whole
    group reads block 3; the first block and the own block's predecessor are always read."""
    q, k, v, _ = inputs(40, N=2, K=1)
    k = k.at[:, 12:16].set(q[:, 39:40, :1] * 4.0)  # block 3 mirrors head 0's last query
    from attention_variants import selection

    sel = selection.Selection(4, 3, 1, 2, scoring="compressed", window=4)
    vis = selection.selected_mask(q, k, sel, scale=1 / math.sqrt(8))  # [B, N, T, S]
    for head in (0, 1):
        row = vis[0, head, 39]
        assert row[:4].all() and row[32:36].all() and row[36:40].all()  # first, local, own
        assert not row[12:16].any()  # top_k 3 = 1 initial + 2 local: no room
    sel = selection.Selection(4, 4, 1, 2, scoring="compressed", window=4)
    vis = selection.selected_mask(q, k, sel, scale=1 / math.sqrt(8))
    assert vis[0, :, 39, 12:16].all() and vis[0, :, 39].sum(-1).tolist() == [16, 16]


def test_decoding_token_by_token_and_in_chunks_equals_the_full_forward():
    """A step scores the cached blocks from their key and value sums, reads its top_k
    blocks and its window; a chunk runs the prefill engine over the cache."""
    options = dict(block=4, top_k=3, window=6)
    q, k, v, gates = inputs(21)
    decoder = av.decoder("nsa", **options)
    cache, extend = decoder.init(2, 23, 2, 8), jax.jit(decoder.extend)
    outs = []
    for t in range(0, 8):  # one token at a time (the position is traced: one compilation)
        x = (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        out, cache = extend(cache, *x, t, branch_gates=gates[:, t : t + 1])
        outs.append(out)
    out, cache = extend(cache, q[:, 8:], k[:, 8:], v[:, 8:], 8, branch_gates=gates[:, 8:])
    outs.append(out)
    full = av.get("nsa", chunk=8, **options)(q, k, v, branch_gates=gates)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **F32)
    sums = jnp.pad(v, ((0, 0), (0, 3), (0, 0), (0, 0))).reshape(2, 6, 4, 2, 8).sum(2)
    np.testing.assert_allclose(cache.value_sums, sums, **F32)


@pytest.mark.parametrize(
    "options,needle",
    [({"window": 0}, "window"), ({"top_k": 2}, "top_k must be at least initial \\+ local = 3"),
     ({"local": 0}, "local"), ({"initial": -1}, "initial")],
)  # fmt: skip
def test_bad_options_are_named(options, needle):
    with pytest.raises(ValueError, match=needle):
        av.get("nsa", **options)


def test_bad_gates_are_named():
    q, k, v, gates = inputs(8)
    with pytest.raises(ValueError, match=r"branch_gates must be \[B, T, N, 3\]"):
        av.get("nsa")(q, k, v, branch_gates=gates[..., :2])
    with pytest.raises(ValueError, match="branch_gates must lie in"):
        av.get("nsa")(q, k, v, branch_gates=gates + 1.5)
