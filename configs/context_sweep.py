"""The default context-length sweep: every registered variant, T = 512..16384, fwd and fwd_bwd.

Run it with `make sweep`, i.e.

    python -m experiments.sweep --config=configs/context_sweep.py

B=1, N=K=8 heads, causal, one document per row; H=64 and float32 on CPU, H=128 and bfloat16 on
GPU/TPU (--config.head_dim=64 for the other). Results go to results/context_sweep/
(results.jsonl, report.md, results.csv, scaling.png).

Repeats are adaptive so the sweep fits in 10 minutes on a 2-core CPU: each cell makes one
warm-up call (timed, to size the rest), then as many timed calls as fit `cell_budget_s` (2 s),
at least `min_repeats` (3) when a call is cheap, at least 1 when a call takes over `long_call_s`
(1 s), at most `max_repeats` (10). A variant stops growing in length once a call (measured or
extrapolated from shorter lengths) would take over `max_call_s` (40 s) -- e.g. `dense`
fwd_bwd past 4096 -- and cells that would overrun `time_budget_s` (540 s) are recorded as
skipped, so the 10 minutes hold as variants are added; the longest lengths are dropped first.
"""

import ml_collections

from experiments.configlib import registered_options


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "kernel"  # what a cell measures: "kernel" (one attention call) or "train_step"
    c.variants = "all"  # comma-separated registry names, or "all" for every registered variant
    c.only_long_context = False  # keep only variants registered long_context (O(T) memory)
    c.baselines = "xla,blockwise"  # run first at each length; crossovers are measured against them
    # Per-variant options {name: {option: value}}, every registered variant's defaults; any can
    # be overridden, e.g. --config.options.sliding_window.window=256 or
    # --config.options.bigbird.window='(2, 2)'.
    c.options = registered_options()
    c.options.xla.implementation = "xla"  # XLA's own softmax attention; "cudnn" on NVIDIA GPUs
    c.lengths = "512,1024,2048,4096,8192,16384"  # comma-separated context lengths T (= S)
    c.modes = "fwd,fwd_bwd"  # fwd: attention output; fwd_bwd: value_and_grad wrt q, k, v
    c.batch = 1  # B
    c.heads = 8  # N, query heads
    c.kv_heads = 8  # K, key/value heads (N % K == 0; K < N is GQA)
    c.head_dim = 0  # H; 0: 64 on CPU, 128 on GPU/TPU (where fused kernels are tuned for 128)
    c.causal = True  # causal self-attention
    c.segments = 1  # documents packed into each row (segment ids), as training packs them
    c.dtype = "auto"  # "auto": float32 on CPU, bfloat16 on GPU/TPU; or float32|bfloat16|float16
    c.seed = 0  # PRNG seed of the random inputs
    c.cell_budget_s = 2.0  # seconds of timed repeats per cell, after the warm-up call
    c.min_repeats = 3  # fewest timed repeats of a cheap call
    c.max_repeats = 10  # most timed repeats
    c.long_call_s = 1.0  # a call slower than this needs only 1 timed repeat
    c.max_call_s = 40.0  # stop growing a variant's length once a call would take longer (s)
    c.time_budget_s = 540.0  # whole-sweep budget (s); cells that would overrun are skipped; 0: none
    c.memory_fraction = 0.9  # predict oom when a cell needs more than this share of free memory
    c.gemm_size = 0  # n of the reference [n,n]@[n,n] GEMM; 0: 2048 on CPU, 8192 on accelerators
    return c
