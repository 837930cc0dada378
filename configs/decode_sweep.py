"""Decoding cost per context length and attention variant: time per generated token and the
cache's memory after T tokens, beside the cost of prefilling those T tokens.

    python -m experiments.sweep --config=configs/decode_sweep.py

An edit of configs/model_sweep.py (the same model: 2 blocks, N=K=4, H=64, width 256, bytes):
each `decode` cell times 16 greedy single-token steps in one jitted lax.scan, starting after T
cached tokens; each `prefill` cell reads T tokens into an empty cache in one call. Expect the
per-token time and the cache to grow as T^1 for KV caches (every masked-softmax variant but
the window), and as T^0 for `sliding_window`'s window cache and the linear variants' recurrent
state. About 10 minutes on a 2-core CPU.
"""

from configs import model_sweep


def get_config():
    c = model_sweep.get_config()
    c.kind = "decode"  # the model generating through its cache
    c.modes = "decode,prefill"  # per-token steps after T tokens; reading T tokens at once
    c.baselines = "dense"  # KV cache, scores materialised
    c.lengths = "512,2048,8192,32768"  # tokens already in the cache (decode) / prefilled
    c.max_call_s = 20.0  # stop growing a variant once a call would take longer (s)
    c.time_budget_s = 540.0  # whole-sweep budget (s)
    return c
