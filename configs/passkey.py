"""Passkey retrieval (Mohtashami & Jaggi 2023): find a 5-digit key hidden in 256-token rows.

    python -m experiments.train --config=configs/passkey.py --workdir=runs/passkey \
        [--config.model.attention=sliding_window] [--config.dataset=passkey/long]

An edit of configs/train.py on `passkey/short`: a repeated filler sentence with the key
(marker and 5 digits) at a random depth, then the query marker; the model is scored on the 5
digits it must copy after the query (eval/accuracy: digits right). Copying from anywhere in
the row is an induction-head task, so the model is a 2-layer attention-only one as for MQAR;
dense attention reached 91% of the digits in 2000 steps (about 13 minutes on a 2-core CPU).
A variant that cannot see the needle from the query (a window shorter than its distance)
cannot do better than chance on those rows; `passkey/long` (L = 2048) is for an accelerator.
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "passkey/short"  # L=256, 5 digits at a random depth; 20000 train / 500 test
    c.num_steps = 2000  # optimizer steps
    c.batch_size = 32  # rows per step
    c.learning_rate = 1e-3  # peak learning rate
    c.warmup_steps = 100  # linear warmup
    c.eval_every = 250  # evaluate on the 500 test rows
    c.checkpoint_every = 500  # steps between checkpoints
    c.model.num_layers = 2  # Transformer blocks
    c.model.num_heads = 2  # N
    c.model.head_dim = 32  # H (width 64)
    c.model.mlp_dim = 0  # attention-only blocks
    return c
