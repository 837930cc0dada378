"""A byte-level language model on the Python standard library's source (`pystdlib/full`).

    python -m experiments.train --config=configs/lm.py --workdir=runs/lm \
        [--config.model.attention=sliding_window]

An edit of configs/train.py: documents (files) are packed into rows of 512 bytes with segment
ids, so no byte attends across files; evaluation reports loss, perplexity and bits per token
(= bits per byte here) on the held-out files.
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "pystdlib/full"  # every stdlib .py file, bytes; 5% of files held out
    c.eval_split = "validation"  # the held-out files
    c.eval_examples = 20  # evaluate on 20 held-out files (more is slower, not better)
    c.seq_len = 512  # bytes per packed row
    c.num_steps = 2000  # optimizer steps
    c.batch_size = 16  # rows per step (8192 bytes)
    c.learning_rate = 2e-3  # peak learning rate
    c.warmup_steps = 100  # linear warmup
    c.eval_every = 250  # steps between evaluations
    c.checkpoint_every = 250  # steps between checkpoints
    c.model.vocab_size = 256  # bytes
    c.model.num_layers = 4  # Transformer blocks
    c.model.num_heads = 4  # N
    c.model.num_kv_heads = 2  # K (GQA)
    c.model.head_dim = 32  # H (width 128)
    c.model.mlp_dim = 384  # gated MLP width
    return c
