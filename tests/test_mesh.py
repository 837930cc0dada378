"""Sequence parallelism on 8 simulated CPU devices (`pytest -m mesh`, see conftest.py).

`ring` against `dense` in forward output and gradients over seq axes of 2, 4 and 8 devices
(the rest of the 8 on a `data` axis), causal and not, packed rows, grouped and single key/value
heads; the balanced (zigzag) layout against the contiguous one; and the causal work of each
layout counted from its definition.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_DEVICES, packed_segments, random_qkv
from jax.sharding import NamedSharding, PartitionSpec

import attention_variants as av
from attention_variants import ring
from attention_variants.tiled import BlockSizes

pytestmark = pytest.mark.mesh

F32 = dict(rtol=2e-5, atol=2e-5)
TILES = dict(block_q=16, block_k=8)  # a shard of 14 or 28 rows: tiles that do not divide it


@pytest.fixture(autouse=True, scope="module")
def eight_devices():
    if jax.device_count() < MESH_DEVICES:
        pytest.fail(f"{jax.device_count()} device(s): run these tests with `pytest -m mesh`")


def mesh(seq: int):
    return jax.make_mesh((MESH_DEVICES // seq, seq), ("data", "seq"))


def outputs_and_grads(fn, q, k, v, **kw):
    """fn's output, lse and the VJP of a random cotangent w.r.t. q, k, v, under one jit."""
    cot = jax.random.normal(jax.random.key(7), q.shape)

    def loss(q, k, v):
        out, lse = fn(q, k, v, return_lse=True, **kw)
        return jnp.sum(out * cot) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, g


def assert_same(got, want, tol=F32):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        np.testing.assert_allclose(a, b, **tol, err_msg=name)


def flat(result):
    out, lse, g = result
    return out, lse, *g


@pytest.mark.parametrize(
    "seq, causal, kv_heads, segmented, layout",
    [
        (2, True, 2, True, "zigzag"),
        (4, True, 1, False, "zigzag"),
        (8, True, 2, True, "zigzag"),
        (8, True, 1, True, "contiguous"),
        (4, False, 2, True, "zigzag"),
        (8, False, 1, False, "zigzag"),
    ],
)
def test_ring_equals_dense(seq, causal, kv_heads, segmented, layout):
    q, k, v = random_qkv(seq, T=112, K=kv_heads, H=8)
    seg = packed_segments(seq, 2, 112) if segmented else None
    kw = dict(causal=causal, segment_ids=seg)
    want = outputs_and_grads(av.get("dense"), q, k, v, **kw)
    fn = av.get("ring", layout=layout, implementation="ring", **TILES)
    with jax.set_mesh(mesh(seq)):
        got = outputs_and_grads(fn, q, k, v, **kw)
    assert_same(flat(got), flat(want))


def three_documents_and_one(T: int):
    """int [2, T] ids: row 0 cut at T*3/8 and T*5/8 (a document that holds no key of another
    device's block leaves that step's rows with none: with two devices' zigzag chunks of T/4,
    device 1's late chunk and device 0's early one), row 1 one document."""
    pos = jnp.arange(T)
    return jnp.stack([(pos >= T * 3 // 8) + (pos >= T * 5 // 8), 0 * pos]).astype(jnp.int32)


def splash_length(seq: int, causal: bool, layout: str) -> int:
    """The shortest T whose chunks are whole splash tiles of 128 positions."""
    return 128 * (2 * seq if causal and layout == "zigzag" else seq)


@pytest.mark.parametrize(
    "seq, causal, kv_heads, layout, packed",
    [
        (2, True, 2, "zigzag", True),
        (2, False, 1, "zigzag", True),
        (4, True, 4, "zigzag", False),
    ],
)
def test_ring_on_splash_equals_dense(seq, causal, kv_heads, layout, packed):
    """The ring's steps on splash (interpret mode here): each block's kernel with its lse, the
    backward from the global lse (and its cotangent); chunks of 128 positions. (The contiguous
    layout: the bfloat16 test below.)"""
    T = splash_length(seq, causal, layout)
    q, k, v = random_qkv(seq, T=T, K=kv_heads, H=8)
    kw = dict(causal=causal, segment_ids=three_documents_and_one(T) if packed else None)
    want = outputs_and_grads(av.get("dense"), q, k, v, **kw)
    fn = av.get("ring", layout=layout, implementation="ring_splash")
    with jax.set_mesh(mesh(seq)):
        got = outputs_and_grads(fn, q, k, v, **kw)
    assert_same(flat(got), flat(want))


def test_ring_on_splash_in_bfloat16_errs_like_the_ring_on_the_jax_engine():
    """bfloat16 operands over 8 devices (splash returns each step's output and gradients in
    bfloat16, rounded before the float32 sums: the error grows with the steps): the error
    against the float32 reference at most 1.5x the jax ring's on each of out, lse, dq, dk, dv."""
    T = splash_length(8, True, "contiguous")
    q, k, v = random_qkv(6, T=T, K=2, H=8)
    kw = dict(causal=True, segment_ids=three_documents_and_one(T))
    want = flat(outputs_and_grads(av.get("dense"), q, k, v, **kw))
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    errors = {}
    with jax.set_mesh(mesh(8)):
        for implementation in ("ring_splash", "ring"):
            fn = av.get("ring", layout="contiguous", implementation=implementation)
            got = flat(outputs_and_grads(fn, *low, **kw))
            errors[implementation] = np.array(
                [np.max(np.abs(np.float32(a) - b)) for a, b in zip(got, want, strict=True)]
            )
    assert np.all(errors["ring"] < 0.1), errors  # bfloat16's error, not a broken ring
    assert np.all(errors["ring_splash"] <= 1.5 * errors["ring"]), errors


def test_auto_rings_on_splash_on_tpu_where_the_chunks_fit(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    spec = av.spec("ring")
    q, k, v = random_qkv(5, T=512, H=8)
    short = [x[:, :256] for x in (q, k, v)]
    with jax.set_mesh(mesh(2)):
        assert spec.choose("auto", q, k, v)[0] == "ring_splash"
        assert spec.choose("auto", *short)[0] == "ring"  # zigzag chunks of 64
        assert spec.choose("auto", *short, causal=False)[0] == "ring_splash"  # halves of 128
        with pytest.raises(NotImplementedError, match=r"T=256 \(.*T a multiple of 512\)"):
            av.get("ring", implementation="ring_splash")(*short)
    assert spec.choose("auto", q, k, v)[0] == "splash"  # one device: the accelerator row


def test_balanced_layout_equals_contiguous_on_sharded_inputs():
    q, k, v = random_qkv(3, T=128, H=8)
    seg = packed_segments(3, 2, 128)
    m = mesh(4)
    with jax.set_mesh(m):  # inputs already split over (data, seq): the ring never gathers them
        placed = NamedSharding(m, PartitionSpec("data", "seq"))
        q, k, v, seg = (jax.device_put(x, placed) for x in (q, k, v, seg))
        got = [
            outputs_and_grads(av.get("ring", layout=layout, **TILES), q, k, v, segment_ids=seg)
            for layout in ring.LAYOUTS
        ]
        assert tuple(got[0][0].sharding.spec)[:2] == ("data", "seq")  # stays split
    assert_same(flat(got[0]), flat(got[1]), tol=dict(rtol=1e-5, atol=1e-6))


def test_calls_the_ring_cannot_serve_run_on_one_device_or_name_the_problem():
    q, k, v = random_qkv(4, T=24, H=8)
    reference = av.spec("ring").bound_reference()
    with jax.set_mesh(mesh(4)):
        # decoding's offset query block: "auto" falls back to the tiled engine
        got = av.get("ring")(q[:, -3:], k, v, q_offset=21)
        np.testing.assert_allclose(got, reference(q[:, -3:], k, v, q_offset=21), **F32)
        with pytest.raises(NotImplementedError, match="q_offset"):
            av.get("ring", implementation="ring")(q[:, -3:], k, v, q_offset=21)
        # rows that do not cut into the ring's chunks: "auto" runs them on one device (it
        # picked the ring and then refused before), an explicit request names the length
        short = [x[:, :20] for x in (q, k, v)]
        np.testing.assert_allclose(av.get("ring")(*short), reference(*short), **F32)
        with pytest.raises(NotImplementedError, match=r"T=20 \(a multiple of 8 .*zigzag"):
            av.get("ring", implementation="ring")(*short)
    with jax.set_mesh(mesh(1)), pytest.raises(NotImplementedError, match="size > 1"):
        av.get("ring", implementation="ring")(q, k, v)
    other_names = jax.make_mesh((2, 4), ("dp", "sp"))
    with jax.set_mesh(other_names), pytest.warns(UserWarning, match=r"has \('dp', 'sp'\)"):
        np.testing.assert_allclose(av.get("ring")(q, k, v), reference(q, k, v), **F32)
    with pytest.raises(ValueError, match=r"T/2n=521 positions has no divisor near block_q"):
        ring.tile_sizes(1042, "zigzag", BlockSizes())  # a prime half shard: tiles of 1


def causal_pairs_per_device(T: int, n: int, layout: str) -> list[int]:
    """Visible (query, key) pairs of causal attention on each device, from the definitions:
    contiguous: device i holds positions [i T/n, (i+1) T/n); zigzag: of 2n equal chunks it
    holds chunks i and 2n-1-i. A query at position p sees the p + 1 keys 0..p."""
    if layout == "contiguous":
        held = [range(i * T // n, (i + 1) * T // n) for i in range(n)]
    else:
        c = T // (2 * n)
        held = [[*range(i * c, i * c + c), *range((2 * n - 1 - i) * c, (2 * n - i) * c)]
                for i in range(n)]  # fmt: skip
    return [sum(p + 1 for p in positions) for positions in held]


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("layout", ring.LAYOUTS)
def test_tile_work_counts_the_pairs_each_device_sees(n, layout):
    T = 64
    got = ring.tile_work(T, n, layout=layout, block_sizes=BlockSizes(1, 1))  # a tile = a pair
    assert got.tolist() == causal_pairs_per_device(T, n, layout)


def test_zigzag_balances_the_causal_work():
    for n in (2, 4, 8):
        zigzag = ring.tile_work(65536, n, layout="zigzag")
        contiguous = ring.tile_work(65536, n, layout="contiguous")
        assert zigzag.max() / zigzag.mean() <= 1.01
        assert contiguous.max() / contiguous.mean() > 1.3


def test_the_shipped_ring_sweep_plans_every_device_count():
    from configs import ring_sweep
    from experiments import plan

    planned = plan.plan_cells(ring_sweep.get_config(), "float32")
    assert {(c.variant, c.devices) for c in planned} == {
        ("blockwise", 1),
        *(("ring", n) for n in (1, 2, 4, 8)),
    }
    assert sorted({c.seq_len for c in planned}) == [4096, 16384, 65536]


def test_the_sweep_runs_the_ring_over_device_counts(tmp_path):
    from configs import ring_sweep
    from experiments import report, sweep

    config = ring_sweep.get_config()
    config.update(dict(lengths="64", seq_devices="1,2,4", modes="fwd_bwd", heads=2, kv_heads=1))
    config.update(dict(head_dim=16, cell_budget_s=0.05, min_repeats=1, max_repeats=2))
    config.options.ring.update(dict(layout="contiguous", block_q=8, block_k=8))
    sweep.run(config, tmp_path, "test", out=io.StringIO())
    rows = {(r["variant"], r.get("devices", 1)): r for r in report.load_rows(tmp_path)}
    assert set(rows) == {("blockwise", 1), ("ring", 1), ("ring", 2), ("ring", 4)}
    assert all(r["status"] == "ok" and r["memory_bytes"] > 0 for r in rows.values())
    assert {k: r["implementation"] for k, r in rows.items()} == {
        ("blockwise", 1): "jax",
        ("ring", 1): "jax",
        ("ring", 2): "ring",
        ("ring", 4): "ring",
    }  # the ring rings where the mesh has a seq axis; elsewhere it is the tiled engine
    assert [rows["ring", n]["imbalance"] for n in (2, 4)] == [
        round(float(w.max() / w.mean()), 4)
        for w in (ring.tile_work(64, n, layout="contiguous", block_sizes=BlockSizes(8, 8))
                  for n in (2, 4))
    ]  # fmt: skip
    md = (tmp_path / "report.md").read_text()
    assert "## Sequence parallelism" in md and "| fwd_bwd | 64 | ring | 4 |" in md


def test_fused_paths_run_per_device_under_a_mesh():
    """XLA cannot partition a Pallas (or cuDNN) call: under a mesh of several devices the
    splash row (interpret mode here) runs in a shard_map over the axes that split the batch,
    forward and gradients equal to the reference."""
    q, k, v = random_qkv(50, B=2, T=256, N=4, K=2)
    kw = dict(segment_ids=packed_segments(51, 2, 256), causal=False)
    fn = av.get("sliding_window", implementation="splash", window=(19, 4))
    ref = av.spec("sliding_window").bound_reference(window=(19, 4))
    cot = jax.random.normal(jax.random.key(52), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * cot)

    with jax.set_mesh(mesh(4)):  # data=2 splits the batch of 2; seq=4 holds it whole
        step = jax.jit(jax.value_and_grad(loss(fn), (0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(step)(q, k, v))
        got = step(q, k, v)
        unpacked = jax.jit(fn)(q, k, v)  # no segment ids: None through the shard_map
    np.testing.assert_allclose(unpacked, ref(q, k, v), rtol=1e-5, atol=1e-5)
    want = jax.jit(jax.value_and_grad(loss(ref), (0, 1, 2)))(q, k, v)
    leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), *leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
