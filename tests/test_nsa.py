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
    """Softmax attention of queries q [G, H] over keys, values [n, H] -> [G, H] (n = 0: 0)."""
    if keys.shape[0] == 0:
        return jnp.zeros_like(q)
    return jax.nn.softmax(q @ keys.T * scale, axis=-1) @ values


def nsa_naive(q, k, v, gates, cu_seqlens, block, top_k, window, initial, local, picks=None):
    """q [S, N, H], k, v [S, K, H], gates [S, N, 3], documents at cu_seqlens -> ([S, N, H],
    the selected blocks of each (query, key/value head)). The selection has no gradient: a
    concrete call ranks (in numpy) and returns `picks`; a call given `picks` replays them, so
    it can be differentiated."""
    N, K, H = q.shape[1], k.shape[1], q.shape[2]
    G, scale = N // K, 1.0 / math.sqrt(H)
    out, chosen_all = [], []
    for lo, hi in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        kd, vd = k[lo:hi], v[lo:hi]
        blocks = (hi - lo) // block  # whole blocks: the compressed tokens (block means)
        kc, vc = ([x[i * block : (i + 1) * block].mean(0) for i in range(blocks)] for x in (kd, vd))
        for t in range(hi - lo):
            whole = (t + 1) // block  # compressed tokens: whole blocks ending at or before t
            own = t // block
            row = []
            for h in range(K):
                heads = q[lo + t, h * G : (h + 1) * G]  # the group's queries [G, H]
                if whole:
                    keys_c = jnp.stack([x[h] for x in kc[:whole]])
                    p = jax.nn.softmax(heads @ keys_c.T * scale, axis=-1)  # [G, whole]
                    cmp = p @ jnp.stack([x[h] for x in vc[:whole]])
                else:
                    p, cmp = jnp.zeros((G, 0)), jnp.zeros((G, H))
                if picks is None:  # rank: forced blocks first, then the group's summed p
                    score = np.asarray(p).sum(0)[:own]
                    ids = np.arange(own)
                    score[(ids < initial) | (ids > own - local)] = np.inf
                    top = np.argsort(-score, kind="stable")[: top_k - 1]
                    chosen = sorted([*map(int, top), own])
                else:
                    chosen = picks[len(chosen_all)]
                chosen_all.append(chosen)
                keys = np.concatenate([np.arange(b * block, min((b + 1) * block, t + 1))
                                       for b in chosen])  # fmt: skip
                slc = attend(heads, kd[keys, h], vd[keys, h], scale)
                lo_w = max(0, t - window + 1)
                win = attend(heads, kd[lo_w : t + 1, h], vd[lo_w : t + 1, h], scale)
                a = gates[lo + t, h * G : (h + 1) * G]  # [G, 3]
                row.append(a[:, :1] * cmp + a[:, 1:2] * slc + a[:, 2:] * win)
            out.append(jnp.concatenate(row))
    return jnp.stack(out), chosen_all


def naive_rows(q, k, v, gates, lengths, picks=None, **options):
    """nsa_naive per row of a batch, each row packing documents of `lengths`."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    rows = [nsa_naive(*x, cu, **options, picks=None if picks is None else picks[i])
            for i, x in enumerate(zip(q, k, v, gates, strict=True))]  # fmt: skip
    return jnp.stack([o for o, _ in rows]), [p for _, p in rows]


def inputs(T, N=4, K=2, H=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, T, N, H))
    k, v = (jax.random.normal(x, (2, T, K, H)) for x in keys[1:3])
    return q, k, v, jax.random.uniform(keys[3], (2, T, N, 3))


@pytest.mark.parametrize(
    "lengths,options",
    [([21], dict(block=4, top_k=4, window=5, initial=1, local=2)),  # 1 block by score
     ([7, 17], dict(block=3, top_k=5, window=4, initial=1, local=1))],  # packed; 3 by score
)  # fmt: skip
def test_nsa_equals_the_papers_definition(lengths, options):
    """Forward and gradients (q, k, v, gates; the naive replaying its own selection), with 2
    query heads sharing a key/value head (the group ranks together)."""
    T = sum(lengths)
    q, k, v, gates = inputs(T, N=2, K=1, seed=T)
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(2, 0))
    call = {} if len(lengths) == 1 else {"segment_ids": ids}
    kernel = functools.partial(av.get("nsa", chunk=8, **options), **call)
    want, picks = naive_rows(q, k, v, gates, lengths, **options)
    assert max(lengths) > options["top_k"] * options["block"]  # some queries rank blocks
    np.testing.assert_allclose(kernel(q, k, v, branch_gates=gates), want, **F32)

    cot = jax.random.normal(jax.random.key(3), q.shape)

    def loss(fn, q, k, v, gates):
        return jnp.sum(fn(q, k, v, gates) * cot)

    ours = lambda q, k, v, g: kernel(q, k, v, branch_gates=g)  # noqa: E731
    theirs = lambda q, k, v, g: naive_rows(q, k, v, g, lengths, picks, **options)[0]  # noqa: E731
    grads = [jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))(q, k, v, gates)
             for fn in (ours, theirs)]  # fmt: skip
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
    blocks and its window; a chunk runs the prefill engine over the cache. From position 16
    one of the top_k = 4 blocks is picked by score (the first and 2 local ones are forced)."""
    options = dict(block=4, top_k=4, window=6)
    q, k, v, gates = inputs(27)
    decoder = av.decoder("nsa", **options)
    cache, extend = decoder.init(2, 29, 2, 8), jax.jit(decoder.extend)
    outs = []
    for lo, hi in [(t, t + 1) for t in range(8)] + [(8, 20)] + [(t, t + 1) for t in range(20, 27)]:
        x = (q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])  # steps share one compilation
        out, cache = extend(cache, *x, lo, branch_gates=gates[:, lo:hi])
        outs.append(out)
    full = av.get("nsa", chunk=8, **options)(q, k, v, branch_gates=gates)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **F32)
    sums = jnp.pad(v, ((0, 0), (0, 5), (0, 0), (0, 0))).reshape(2, 8, 4, 2, 8).sum(2)
    np.testing.assert_allclose(cache.value_sums, sums, **F32)
    with pytest.raises(ValueError, match=r"branch_gates must be \[B, T, N, 3\]"):
        decoder.extend(cache, *x, 26, branch_gates=gates[:, :1, :, :2])
    with pytest.raises(TypeError, match="moba: unknown call argument.s. branch_gates"):
        av.decoder("moba").extend(cache, *x, 26, branch_gates=gates[:, :1])


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
