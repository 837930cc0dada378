"""Decoding caches, for every registered variant (no per-variant code): token by token and in
chunks, the new tokens' outputs equal the variant's full causal forward at their positions."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, small_cases, variant_cases

import attention_variants as av
from attention_variants import decoding, registry
from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, Sinks, Window, causal_or_full
from attention_variants.tiled import block_sizes

CASES = variant_cases()
SMALL = small_cases()
F32 = dict(rtol=1e-5, atol=1e-5)


def full_forward(name, opts, q, k, v):
    """The variant's causal output over the whole sequence, from its reference."""
    return av.spec(name).bound_reference(**opts)(q, k, v, causal=True)


@functools.cache
def jitted(name, opts):
    """The variant's decoder and its jitted `extend`, made once per (name, options): cases of
    the same shapes (one chunk length, one cache) share the compiled step across tests."""
    decoder = av.decoder(name, **dict(opts))
    return decoder, jax.jit(decoder.extend)


def decode(name, opts, q, k, v, chunks, max_len=None):
    """Feeds q, k, v through the cache in chunks of the given lengths; the outputs joined."""
    B, T, N, H = q.shape
    decoder, extend = jitted(name, tuple(sorted(opts.items())))
    cache = decoder.init(B, max_len or T, k.shape[2], H, q.dtype, num_heads=q.shape[2])
    outs, start = [], 0
    for size in chunks:
        part = slice(start, start + size)
        out, cache = extend(cache, q[:, part], k[:, part], v[:, part], jnp.int32(start))
        outs.append(out)
        start += size
    assert start == T
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name,opts", CASES)
def test_token_by_token_equals_the_full_forward(name, opts):
    q, k, v = random_qkv(1, B=2, T=21, N=4, K=2, H=16)  # GQA
    out, _ = decode(name, opts, q, k, v, [1] * 21, max_len=24)
    np.testing.assert_allclose(out, full_forward(name, opts, q, k, v), **F32)


@pytest.mark.parametrize("name,opts", SMALL)
def test_multi_query_token_by_token(name, opts):
    q, k, v = random_qkv(2, B=1, T=21, N=4, K=1, H=16)  # MQA
    out, _ = decode(name, opts, q, k, v, [1] * 21)
    np.testing.assert_allclose(out, full_forward(name, opts, q, k, v), **F32)


@pytest.mark.parametrize("name,opts", SMALL)
def test_chunked_prefill_equals_the_full_forward(name, opts):
    q, k, v = random_qkv(3, B=2, T=21, N=4, K=2, H=16)  # T as above: the eager ops are shared
    ref = full_forward(name, opts, q, k, v)
    # Tokens one by one then chunks, chunks with a shorter last one, the whole prompt at once,
    # each filling the cache exactly: four chunk lengths (1, 6, 3, 21), each compiled once.
    for chunks in ([1] * 3 + [6, 6, 6], [6, 6, 6, 3], [21]):
        out, _ = decode(name, opts, q, k, v, chunks)
        np.testing.assert_allclose(out, ref, **F32, err_msg=str(chunks))


def test_each_family_gets_its_cache():
    kinds = {n: av.decoder(n).kind for n in av.names()}
    assert kinds["dense"] == kinds["blockwise"] == kinds["fixed"] == kinds["bigbird"] == "kv"
    assert kinds["sliding_window"] == "window" and kinds["linear"] == "recurrent"
    # A window spanning its pair form too: (left, right) keeps `left` keys when causal.
    cache = av.decoder("sliding_window", window=(6, 3)).init(1, 100, 2, 8)
    assert cache.k.shape == (1, 6, 2, 8)


def test_window_cache_stays_window_long():
    W = 5
    q, k, v = random_qkv(4, B=2, T=3 * W, N=4, K=2, H=16)
    opts = {"window": W, "block_q": 4, "block_k": 4}
    out, cache = decode("sliding_window", opts, q, k, v, [1] * (3 * W), max_len=10_000)
    assert cache.k.shape == cache.v.shape == (2, W - 1, 2, 16)  # the keys the window still sees
    np.testing.assert_allclose(out, full_forward("sliding_window", opts, q, k, v), **F32)


def test_window_with_sinks_keeps_the_sinks_past_three_windows():
    W, n = 5, 3
    q, k, v = random_qkv(8, B=2, T=4 * W, N=4, K=2, H=16)
    opts = {"window": W, "sinks": n, "block_q": 4, "block_k": 4}
    full = full_forward("sliding_window", opts, q, k, v)
    for chunks in ([1] * (4 * W), [2, 7, 1, 10]):  # sinks written within a chunk, or across
        out, cache = decode("sliding_window", opts, q, k, v, chunks, max_len=10_000)
        assert cache.k.shape == (2, n + W - 1, 2, 16)  # the sinks and the keys the window sees
        np.testing.assert_allclose(out, full, **F32, err_msg=str(chunks))
        np.testing.assert_array_equal(cache.k[:, :n], k[:, :n])  # the first keys stay
    window = av.decoder("sliding_window", window=64, sinks=4)
    sizes = {av.cache_bytes(window.init(2, length, 2, 16)) for length in (1024, 32768)}
    assert sizes == {2 * 2 * (64 - 1 + 4) * 2 * 16 * 4}  # keys and values, float32


def test_sinks_of_a_packed_document_are_its_own_first_keys():
    q, k, v = random_qkv(9, B=1, T=24, N=2, K=1, H=8)
    fn = av.get("sliding_window", window=4, sinks=2, block_q=8, block_k=8)
    packed = fn(q, k, v, segment_ids=jnp.asarray([[0] * 10 + [1] * 14]))
    alone = fn(q[:, 10:], k[:, 10:], v[:, 10:])
    np.testing.assert_allclose(packed[:, 10:], alone, **F32)
    np.testing.assert_allclose(packed[:, :10], fn(q[:, :10], k[:, :10], v[:, :10]), **F32)


def test_cache_memory_by_kind():
    B, K, H = 2, 2, 16
    kv = av.cache_bytes(av.decoder("dense").init(B, 1000, K, H, jnp.bfloat16))
    assert kv == 2 * B * 1000 * K * H * 2  # keys and values, bfloat16, K heads (not N)
    window = av.decoder("sliding_window", window=64)
    assert av.cache_bytes(window.init(B, 100, K, H)) == av.cache_bytes(window.init(B, 10**5, K, H))
    recurrent = av.cache_bytes(av.decoder("linear").init(B, 10**6, K, H))
    assert recurrent == B * K * H * (H + 1) * 4  # float32 sums [B, K, F=H, H+1]


def test_bfloat16_cache_keeps_its_dtype():
    q, k, v = random_qkv(5, B=1, T=9, N=2, K=2, H=16, dtype=jnp.bfloat16)
    out, cache = decode("blockwise", {"block_q": 4, "block_k": 4}, q, k, v, [4, 1, 4])
    assert cache.k.dtype == jnp.bfloat16 and out.dtype == jnp.bfloat16
    ref = full_forward("blockwise", {}, *[x.astype(jnp.float32) for x in (q, k, v)])
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=3e-2, atol=3e-2)


def test_a_family_without_a_cache_cannot_decode():
    class NoCache(MaskedSoftmax):
        def build(self, name, declaration):
            return {**super().build(name, declaration), "decode": None}

    try:
        av.register("toy_no_cache", family=NoCache(tiles=None))(
            lambda *, causal: causal_or_full(causal)
        )
        with pytest.raises(NotImplementedError, match="'toy_no_cache' cannot decode"):
            av.decoder("toy_no_cache")
    finally:
        registry._REGISTRY.pop("toy_no_cache", None)


def test_unknown_variant_and_options_are_named():
    with pytest.raises(ValueError, match="known variants"):
        av.decoder("nope")
    with pytest.raises(TypeError, match="windw"):
        av.decoder("sliding_window", windw=3)


@dataclasses.dataclass(frozen=True)
class ChunkLocal(Mask):
    """Causal within fixed chunks of `size` positions: depends on where the chunk starts, and
    (as a user may) says nothing about shift invariance."""

    size: int = 4

    @property
    def reach(self):
        return self.size - 1, 0

    def visible(self, q_pos, k_pos, doc_len=None):
        return (q_pos // self.size == k_pos // self.size) & (k_pos <= q_pos)


@dataclasses.dataclass(frozen=True)
class ClaimedChunkLocal(ChunkLocal):
    shift_invariant = True  # wrong: the chunks sit at fixed positions


@dataclasses.dataclass(frozen=True)
class SinksAndWindow(Mask):
    """StreamingLLM's pattern written as a user would: the first 2 keys plus a window of 3,
    with no word on shift invariance (it is not: the sinks sit at positions 0 and 1)."""

    @property
    def reach(self):
        return None, 0

    def visible(self, q_pos, k_pos, doc_len=None):
        return (k_pos <= q_pos) & ((k_pos < 2) | (k_pos > q_pos - 3))


@pytest.fixture
def registered():
    """Registers toy variants for one test: register(name, declaration)."""
    names = []

    def register(name, declaration):
        names.append(name)
        av.register(name, family=MaskedSoftmax())(declaration)

    yield register
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_a_position_dependent_mask_decodes_through_a_window_at_true_positions(registered):
    """The window cache applies the mask at each slot's true position, so a bounded pattern
    that depends on where it sits (chunks at fixed positions) decodes as its full forward."""
    registered("toy_chunks", lambda *, causal: ChunkLocal() if causal else Mask())
    assert av.decoder("toy_chunks").kind == "window"
    q, k, v = random_qkv(6, B=1, T=11, N=2, K=1, H=8)
    out, cache = decode("toy_chunks", {}, q, k, v, [1] * 6 + [2, 3])
    assert cache.k.shape[1] == 3  # the reach back
    np.testing.assert_allclose(out, full_forward("toy_chunks", {}, q, k, v), **F32)


def test_a_false_claim_of_shift_invariance_is_refused(registered):
    registered("toy_claimed", lambda *, causal: ClaimedChunkLocal() if causal else Mask())
    q, k, v = random_qkv(6, B=1, T=11, N=2, K=1, H=8)
    with pytest.raises(ValueError, match="ClaimedChunkLocal declares shift_invariant = True"):
        av.get("toy_claimed")(q, k, v)
    with pytest.raises(ValueError, match="remove the claim"):
        av.decoder("toy_claimed")


def test_a_mask_silent_on_shift_invariance_is_per_document_in_packed_rows(registered):
    """The safe default: packed documents each see the pattern they would see alone (with the
    old default, True, the sinks of the second document were the row's first keys)."""
    registered("toy_sinks", lambda *, causal: SinksAndWindow() if causal else Mask())
    q, k, v = random_qkv(9, B=1, T=24, N=2, K=1, H=8)
    ids = jnp.asarray([[0] * 10 + [1] * 14])
    fn = av.get("toy_sinks", block_q=8, block_k=8)
    packed = fn(q, k, v, segment_ids=ids)
    alone = fn(q[:, 10:], k[:, 10:], v[:, 10:])
    np.testing.assert_allclose(packed[:, 10:], alone, **F32)


def test_a_causal_only_declaration_serves_causal_calls_with_tiles_from_its_band(registered):
    """As a newcomer writes it (README, "Adding a variant"): no `causal` parameter."""
    registered("toy_streaming", lambda *, window=3: Window(window - 1, 0) | Sinks(2))
    spec = av.spec("toy_streaming")
    assert spec.causal_only and spec.defaults["block_q"] is None
    assert av.get("toy_streaming", window=64) is not None  # validated without causal=False
    q, k, v = random_qkv(3, B=1, T=19, N=2, K=1, H=8)
    with pytest.raises(NotImplementedError, match="'toy_streaming' serves causal calls only"):
        av.get("toy_streaming")(q, k, v, causal=False)
    np.testing.assert_allclose(av.get("toy_streaming")(q, k, v),
                               spec.bound_reference()(q, k, v), **F32)  # fmt: skip
    out, cache = decode("toy_streaming", {}, q, k, v, [1] * 19)
    assert cache.k.shape[1] == 2 + 2
    np.testing.assert_allclose(out, full_forward("toy_streaming", {}, q, k, v), **F32)


@pytest.mark.parametrize("name", ["blockwise", "sliding_window"])
def test_an_explicit_implementation_that_cannot_decode_falls_back(name):
    """A model trained on splash (or cuDNN) decodes: neither takes decoding offsets (KV cache)
    or kv_segment_ids (window cache), so decoding runs on what serves the call."""
    q, k, v = random_qkv(8, B=1, T=6, N=2, K=1, H=8)
    mask = dict(window=3) if name == "sliding_window" else {}
    out, _ = decode(name, dict(implementation="splash", **mask), q, k, v, [3, 1, 1, 1])
    np.testing.assert_allclose(out, full_forward(name, mask, q, k, v), **F32)


def test_a_mask_that_sees_later_keys_cannot_decode(registered):
    registered("toy_full", lambda *, causal: Mask())  # ignores `causal`
    with pytest.raises(NotImplementedError, match="'toy_full' cannot decode.*later keys"):
        av.decoder("toy_full")


def test_writing_past_the_kv_cache_raises_or_gives_nan():
    q, k, v = random_qkv(7, B=1, T=6, N=2, K=1, H=8)
    decoder = av.decoder("dense")
    cache = decoder.init(1, 4, 1, 8)
    with pytest.raises(ValueError, match="max_len=4 tokens: 3 cached plus 2 new would be 5"):
        decoder.extend(cache, q[:, :2], k[:, :2], v[:, :2], 3)
    extend = jax.jit(decoder.extend)  # a traced position cannot raise: NaN, not a wrong number
    out, _ = extend(cache, q[:, :2], k[:, :2], v[:, :2], jnp.int32(3))
    assert np.isnan(out).all()
    out, _ = extend(cache, q[:, :2], k[:, :2], v[:, :2], jnp.int32(2))
    assert np.isfinite(out).all()


def test_a_token_of_a_block_pattern_reads_only_its_scheduled_key_tiles(monkeypatch):
    """A generated token of `fixed` or `bigbird` reads only the key tiles that the static
    schedule lists for a query tile (the own block and summaries; global, window and random
    blocks), not every cached key, and equals the full forward's row, with score modifiers and
    either kind of position; `blockwise`, whose schedule lists every earlier tile, keeps the
    engine."""
    read = []
    attend = decoding.softmax_attention

    def counted(q, k, v, **kw):
        read.append(k.shape[1])
        return attend(q, k, v, **kw)

    monkeypatch.setattr(decoding, "softmax_attention", counted)
    L, at = 1024, 1000
    q, k, v = random_qkv(30, B=2, T=L, N=2, K=1, H=16)
    bk = block_sizes(av.spec("fixed").mask(True), False).block_k  # 16 on CPU, 64 elsewhere
    fixed_reads = (128 // bk + L // 128 - 1) * bk  # own block, and a summary tile per block
    cases = [("fixed", {}, fixed_reads), ("bigbird", {}, L // 2), ("blockwise", {}, None),
             ("fixed", {"bias": "alibi", "softcap": 2.0}, fixed_reads)]  # fmt: skip
    for name, opts, most in cases:
        read.clear()
        decoder = av.decoder(name, **opts)
        cache = decoder.init(2, L, 1, 16, q.dtype)
        _, cache = decoder.extend(cache, q[:, :at], k[:, :at], v[:, :at], jnp.int32(0))
        new = slice(at, at + 1)
        position = at if opts else jnp.int32(at)  # a Python int is one position for all rows
        out, _ = decoder.extend(cache, q[:, new], k[:, new], v[:, new], position)
        want = av.get(name, **opts)(q, k, v, causal=True)[:, new]
        np.testing.assert_allclose(out, want, **F32, err_msg=name)
        assert len(read) == (0 if most is None else 1) and all(n <= most for n in read), name
