"""The `kernel` kind: one attention call on random inputs, modes `fwd` and `fwd_bwd`; on a
`seq` mesh of the cell's devices for mesh-aware variants (ring)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import attention_variants as av
from experiments.cells import (
    BACKWARD_FLOPS,
    Built,
    Cell,
    attention_flops,
    document_ids,
    seq_mesh,
    within,
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


def ring_imbalance(cell: Cell) -> float:
    """Causal work of the busiest device over the mean (tiles the ring's schedules run)."""
    from attention_variants import ring
    from attention_variants.tiled import BlockSizes

    options = av.spec(cell.variant).options(**cell.options)
    tiles = BlockSizes(options["block_q"], options["block_k"])
    work = ring.tile_work(cell.seq_len, cell.devices, layout=options["layout"],
                          causal=cell.causal, block_sizes=tiles)  # fmt: skip
    return round(float(work.max() / work.mean()), 4)
