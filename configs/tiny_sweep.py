"""A seconds-long sweep for the tests: two variants, two short lengths, small heads.

python -m experiments.sweep --config=configs/tiny_sweep.py --workdir=/tmp/tiny_sweep
"""

from configs import context_sweep


def get_config():
    c = context_sweep.get_config()
    c.variants = "xla,blockwise"  # the two baselines
    c.options.blockwise.block_q = 64  # several tiles at these lengths
    c.options.blockwise.block_k = 64
    c.lengths = "128,256"  # short lengths
    c.heads = 2  # N
    c.kv_heads = 1  # K (exercises GQA)
    c.head_dim = 16  # H
    c.cell_budget_s = 0.05  # a few repeats only
    c.min_repeats = 2  # fewest timed repeats
    c.max_repeats = 3  # most timed repeats
    c.gemm_size = 256  # a small reference GEMM
    return c
