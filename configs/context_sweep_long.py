"""Long-context sweep of the O(T) variants (registered `long_context`: O(T) memory), T up to 131072.

    python -m experiments.sweep --config=configs/context_sweep_long.py

An edit of configs/context_sweep.py: only variants whose time and memory are registered as
O(T) (e.g. blockwise, whose *memory* is O(T)), lengths 1024..131072, a larger per-call cap and
no whole-sweep budget. On a 2-core CPU, blockwise (causal, O(T^2) time) stops growing around
T=32768-65536 under `max_call_s`; add time or drop fwd_bwd with `--config.modes=fwd`.
"""

from configs import context_sweep


def get_config():
    c = context_sweep.get_config()
    c.only_long_context = True  # keep only the O(T) variants
    c.lengths = ",".join(str(1024 * 2**i) for i in range(8))  # 1024 .. 131072
    c.max_call_s = 120.0  # longer calls are acceptable here
    c.time_budget_s = 0.0  # no whole-sweep budget (runs until every variant stops growing)
    return c
