"""Autoregressive generation through the model's decoding cache.

    tokens = generate(model, params, prompt [B, P], max_new_tokens, rng, temperature=0.8,
                      top_k=40, top_p=0.95)                     # -> [B, P + max_new_tokens]
    targets = generate(encoder_decoder, params, inputs [B, S], max_new_tokens, rng,
                       inputs_segment_ids=None)                 # -> [B, max_new_tokens]

An EncoderDecoder encodes its `inputs` once, then its decoder writes from the start token (0).

The prompt is prefilled in one call (or in chunks of `prefill_chunk` tokens), then a
`lax.scan` of single-token steps samples the rest; all of it is one `jit`. Temperature 0 is
greedy (argmax). A KV cache holds `max_len` tokens (default: prompt plus new tokens) and a
longer request is refused; a window or recurrent cache has no such limit. Every row of the
prompt has the same length (one cache position for the batch). The sampling options are
static: each new value compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import attention_variants as av
from transformer.encoder_decoder import EncoderDecoder
from transformer.model import TransformerLM


def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """One token per row from logits [B, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all) and to
    the smallest set whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def check_request(
    model: TransformerLM | EncoderDecoder,
    prompt_len: int,
    max_new_tokens: int,
    max_len=None,
    **sampling,
):
    """The cache length to use; ValueError naming the numbers when the request cannot fit or
    a sampling option is out of range (temperature >= 0, 0 <= top_k <= vocab, 0 < top_p <= 1).
    A TransformerLM's prompt and new tokens (the sequence it returns) must fit `max_len`. An
    EncoderDecoder's prompt is the source (`prompt_len` 0 here); what it returns, the new
    tokens, must fit (its decoder holds the start token and all new tokens but the last)."""
    cfg = model.config
    least = 0 if isinstance(model, EncoderDecoder) else 1
    if max_new_tokens < 1:
        raise ValueError(f"need max_new_tokens >= 1, got {max_new_tokens}")
    if prompt_len < least:
        raise ValueError(f"need a prompt of >= 1 token, got {prompt_len}")
    temperature, top_k = sampling.get("temperature", 1.0), sampling.get("top_k", 0)
    top_p = sampling.get("top_p", 1.0)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={cfg.vocab_size}], got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    total = prompt_len + max_new_tokens
    max_len = total if max_len is None else max_len
    decoders = [av.decoder(name, **cfg.options_of(name)) for name in cfg.variants]  # or raise
    asked = f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} is {total}"
    if not least:
        asked = f"the decoder's start token and new tokens but the last: {total}"
    if any(d.needs_max_len for d in decoders) and total > max_len:
        raise ValueError(f"{asked}, more than the KV cache's max_len={max_len}")
    if cfg.positions == "learned" and total > cfg.max_len:
        raise ValueError(f"{asked}, more than the learned positions' max_len={cfg.max_len}")
    return max_len


def generate(
    model: TransformerLM | EncoderDecoder,
    params,
    prompt,
    max_new_tokens: int,
    rng,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prefill_chunk: int = 0,
    max_len: int | None = None,
    inputs_segment_ids=None,
):
    """TransformerLM: prompt int [B, P] -> int32 [B, P + max_new_tokens], the prompt and its
    continuation. EncoderDecoder: prompt = the source `inputs` [B, S] (with their
    `inputs_segment_ids`, 0 on padding) -> the written targets, int32 [B, max_new_tokens]."""
    prompt = jnp.asarray(prompt, jnp.int32)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    written = 0 if isinstance(model, EncoderDecoder) else prompt.shape[1]  # the decoder's
    max_len = check_request(model, written, max_new_tokens, max_len, **sampling)
    if isinstance(model, EncoderDecoder):
        return write_targets(
            model, params, prompt, inputs_segment_ids, rng, max_new_tokens=max_new_tokens,
            max_len=max_len, **sampling,
        )  # fmt: skip
    if inputs_segment_ids is not None:
        raise ValueError("inputs_segment_ids are the source's documents of an EncoderDecoder")
    return generate_tokens(
        model, params, prompt, rng, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, prefill_chunk=prefill_chunk, max_len=max_len,
    )  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "prefill_chunk", "max_len"),
)
def generate_tokens(
    model, params, prompt, rng, *, max_new_tokens, prefill_chunk, max_len, **sampling
):
    """The jitted core of `generate` (every keyword static; `check_request` first)."""
    B, P = prompt.shape
    empty = jnp.zeros((B, max_len), jnp.int32)
    cache = model.init(jax.random.key(0), empty, decode=True)["cache"]

    def extend(cache, tokens):  # the logits of the last token only
        last = jnp.full((B, 1), tokens.shape[1] - 1, jnp.int32)
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, logits_at=last,
            mutable=["cache"],
        )  # fmt: skip
        return logits[:, -1], variables["cache"]

    size = prefill_chunk or P
    for start in range(0, P, size):
        logits, cache = extend(cache, prompt[:, start : start + size])
    return jnp.concatenate([prompt, sampled(extend, logits, cache, rng, max_new_tokens, sampling)],
                           axis=1)  # fmt: skip


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p",
                                                "max_len"),
)  # fmt: skip
def write_targets(model, params, inputs, inputs_segment_ids, rng, *, max_new_tokens, max_len,
                  **sampling):  # fmt: skip
    """The jitted core of `generate` for an EncoderDecoder: encode, then decode from 0."""
    B = inputs.shape[0]
    encoded = model.apply({"params": params}, inputs, inputs_segment_ids, method="encode")
    empty = jnp.zeros((B, max_len), jnp.int32)
    cache = model.init(jax.random.key(0), inputs, empty, inputs_segment_ids, decode=True)["cache"]

    def extend(cache, tokens):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, encoded, inputs, tokens, inputs_segment_ids,
            decode=True, mutable=["cache"], method="decode",
        )  # fmt: skip
        return logits[:, -1], variables["cache"]

    logits, cache = extend(cache, jnp.zeros((B, 1), jnp.int32))
    return sampled(extend, logits, cache, rng, max_new_tokens, sampling)


def sampled(extend, logits, cache, rng, max_new_tokens: int, sampling):
    """max_new_tokens tokens [B, n]: the first drawn from `logits`, each next from the logits
    that `extend(cache, token)` gives for the one before (a scan)."""
    rngs = jax.random.split(rng, max_new_tokens)
    first = sample_logits(logits, rngs[0], **sampling)

    def step(carry, rng):
        token, cache = carry
        logits, cache = extend(cache, token[:, None])
        following = sample_logits(logits, rng, **sampling)
        return (following, cache), following

    _, rest = lax.scan(step, (first, cache), rngs[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
