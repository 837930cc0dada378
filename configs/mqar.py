"""MQAR at Zoology's sizes: a 2-layer attention-only model, width 64, on L=128 rows of 8 pairs.

    python -m experiments.train --config=configs/mqar.py --workdir=runs/mqar \
        [--config.model.attention=linear]

An edit of configs/train.py: Zoology trains 2-layer models of width 64 on MQAR with vocabulary
8192. Here 20000 training rows (`mqar/zoology`: V=8192, L=128, N=8, zero filler as Zoology's
Figure 2), batch 64, 2000 steps. Not measured in this form; a close setting (one head, L=64,
N=4, the same V and rows) did not learn to recall within 2750 steps, since each key is seen in
only about 20 rows (docs/quality.md): configs/zoology_mqar.py, with V=512 and convergence
checks, is the measured MQAR protocol.
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "mqar/zoology"  # V=8192, L=128, N=8; 20000 train / 1000 test rows
    c.num_steps = 2000  # optimizer steps (6.4 epochs at batch 64)
    c.batch_size = 64  # rows per step
    c.learning_rate = 3e-3  # peak learning rate
    c.warmup_steps = 100  # linear warmup
    c.eval_every = 250  # evaluate on the 1000 test rows
    c.checkpoint_every = 500  # steps between checkpoints
    c.model.num_heads = 2  # N (width 64 = 2 x 32)
    c.model.head_dim = 32  # H
    c.model.mlp_dim = 0  # attention-only blocks, as Zoology's MQAR models
    return c
