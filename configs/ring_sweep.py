"""Sequence parallelism: `ring` over 1, 2, 4 and 8 devices of a `seq` mesh axis at fixed T.

    python -m experiments.sweep --config=configs/ring_sweep.py
    python -m experiments.sweep --config=configs/ring_sweep.py \
        --config.options.ring.layout=contiguous --workdir=results/ring_sweep_contiguous

An edit of configs/context_sweep.py (B=1, N=K=8, causal; H=64 on CPU, 128 on GPU/TPU). On a
CPU host the sweep asks XLA for 8 simulated devices; they share the host's cores, so times
measure the ring's overhead against `blockwise` on one device, not a speed-up. Memory is XLA's
compiled analysis per device: it should fall about as 1/devices. Rows carry `imbalance`, the busiest device's
causal tiles over the mean (zigzag layout: 1.0; contiguous: about 2 - 1/n). Calls that would
take over `max_call_s` (T=65536 on 2 cores) are compiled for their memory only.
"""

from configs import context_sweep


def get_config():
    c = context_sweep.get_config()
    c.variants = "blockwise,ring"
    c.baselines = "blockwise"  # one device, the same tiled engine the ring runs per step
    c.seq_devices = "1,2,4,8"  # devices on the `seq` axis (ring only; 1: no mesh)
    c.lengths = "4096,16384,65536"  # total T, split over the devices
    c.max_call_s = 30.0  # longer calls are compiled for memory only
    c.time_budget_s = 900.0
    return c
