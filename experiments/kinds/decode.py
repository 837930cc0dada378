"""The `decode` kind: the TransformerLM reading T tokens into its cache (`prefill`) or
generating through it after T tokens (`decode`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import attention_variants as av
from experiments.cells import (
    DECODE_STEPS,
    Built,
    Cell,
    cell_model,
    layer_variants,
    matmul_weights,
    variant_options,
)


def build_decode(cell: Cell, config: Any) -> Built:
    """`prefill`: the model reads T random tokens into an empty cache in one call (logits at
    the last position only). `decode`: DECODE_STEPS greedy single-token steps in one lax.scan
    (the cache updated in place, as `transformer.generate` does; donated from call to call,
    so no call copies it) from position T, so each step attends to T + i cached tokens. The
    cache's contents do not change the work, so it starts empty at position T rather than after
    a prefill, and each call starts at T again (moba's block sums keep growing: the same work
    with other numbers). Rows carry `cache_bytes` (the cache of
    the whole model, every layer) and `decode_steps` (time per token = time / steps)."""
    steps = DECODE_STEPS if cell.mode == "decode" else 0
    B, T = cell.batch, cell.seq_len
    cfg, model = cell_model(cell, T + steps)
    key = jax.random.key(config.seed)
    tokens = jax.random.randint(key, (B, T), 0, cfg.vocab_size)
    params = jax.jit(model.init)(key, tokens[:, :1])["params"]
    empty = jnp.zeros((B, T + steps), jnp.int32)
    cache = jax.jit(lambda: model.init(key, empty, decode=True)["cache"])()

    def extend(params, cache, tokens, logits_at=None):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, logits_at=logits_at,
            mutable=["cache"],
        )  # fmt: skip
        return logits[:, -1], variables["cache"]

    layers = layer_variants(cell, cfg.num_layers)
    options = {n: av.spec(n).options(**o) for n, o in variant_options(cell).items()}

    def attention(B, T, S, N, H, chunk=None):
        """The blocks' attention FLOPs (a linear-state step: one chunk of `chunk` tokens)."""
        one_chunk = lambda o: {**o, "chunk": chunk} if chunk and "chunk" in o else o  # noqa: E731
        return sum(av.spec(n).flops(B, T, S, N, H, **one_chunk(options[n])) for n in layers)

    weights = matmul_weights(params, cfg.tie_embeddings)
    N, H = cell.heads, cell.head_dim
    fields = {"cache_bytes": av.cache_bytes(cache), "decode_steps": steps}
    if cell.mode == "prefill":

        def prefill(params, cache, tokens):
            return extend(params, cache, tokens, jnp.full((B, 1), T - 1, jnp.int32))[0]

        # Logits at the last position only: the output layer's V x D weights count once.
        logits_weights = cfg.vocab_size * cfg.width
        flops = 2.0 * (weights - logits_weights) * B * T + 2.0 * logits_weights * B
        flops += attention(B, T, T, N, H)
        return Built(prefill, (params, cache, tokens), flops, B * T, fields=fields)
    cache = {**cache, "position": jnp.int32(T)}

    def decode(params, cache, token):
        def step(carry, _):
            token, cache = carry
            logits, cache = extend(params, cache, token[:, None])
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None

        (token, cache), _ = jax.lax.scan(step, (token, cache), None, length=steps)
        return token, {**cache, "position": jnp.int32(T)}  # the next call decodes T.. again

    # The last query's visible keys: the variant's count at T + i + 1 less that at T + i (a
    # linear-state step runs as one chunk of one token).
    marginal = sum(
        attention(B, t + 1, t + 1, N, H, chunk=1) - attention(B, t, t, N, H, chunk=1)
        for t in range(T, T + steps)
    )
    flops = 2.0 * weights * B * steps + marginal
    return Built(decode, (params, cache, tokens[:, -1]), flops, B * steps, fields=fields,
                 carry=1)  # fmt: skip
