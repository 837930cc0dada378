"""Zoology's MQAR headline (Arora et al. 2023, Figure 2): softmax attention recalls at every
length, the fixed-state variants fall off as the number of pairs N grows.

    python -m experiments.sweep --config=configs/zoology_mqar.py \
        [--config.lengths=64] [--config.head_dim=128 --workdir=results/zoology_mqar_d128] \
        [--config.seeds=0,1,2] [--config.variants=blockwise,linear]

Their grid (`iclr24_zoology_figure2`): (L, N) = (64, 4), (128, 8), (256, 16); 2 layers, one
head, no MLP, d_model 64-512, vocabulary 8192, learning rates 1e-4-1e-2 on a log grid, zero
filler (`random_non_queries=False`), 64 epochs of 100K rows at batch 512. Here the same model
and data at d_model 64 (one head of 64; `--config.head_dim=128` for d_model 128, another
workdir: one workdir holds one setting), every (L, N) with 4N <= L on the lengths' grid (N up
to L/4, beyond the paper), 20000 training rows, batch 64, learning rates 1e-3, 3e-3, 1e-2, and
training to convergence: a cell stops once its held-out accuracy reaches 0.99 (evaluated every
250 steps on 1000 rows), or at the 4000-step cap (flagged unconverged in the report). The
report keeps each variant's best rate per cell (mean over the seeds).
"""

from configs import ablation_mqar


def get_config():
    c = ablation_mqar.get_config()
    c.variants = "blockwise,linear"  # softmax attention and a fixed state (elu + 1)
    c.baselines = "blockwise"
    c.lengths = "64,128"  # L (the paper's grid also has 256: --config.lengths=64,128,256)
    c.num_pairs = "L/16"  # N: the paper's (64, 4), (128, 8), (256, 16); L/8,L/4 go beyond
    c.seeds = "0"  # one seed by default (the docs' table: --config.seeds=0,1,2)
    c.learning_rates = "1e-3,3e-3,1e-2"  # swept per variant; the report keeps the best
    c.batch = 64  # rows per step (Zoology: 512)
    c.heads = 1  # one head, as Zoology's MQAR models
    c.kv_heads = 1
    c.head_dim = 64  # d_model = 64 (one head)
    c.options.sliding_window.window = 32  # a window shorter than every row
    c.data.vocab = 512  # V > L; Zoology: 8192, which 20000 rows cannot teach here (docstring)
    c.data.num_train = 20000  # training rows (Zoology: 100K)
    c.data.num_test = 1000  # held-out rows
    c.train.num_steps = 3000  # step cap, the same for every variant (9.6 epochs of 20000 rows)
    c.train.warmup_steps = 100  # linear warmup, then cosine decay to the cap
    c.train.eval_every = 250  # evaluate every this many steps
    c.train.threshold = 0.99  # converged: held-out accuracy >= 0.99 (the cell stops there)
    c.time_budget_s = 0.0  # no whole-grid budget: every cell runs (see the docstring's times)
    return c
