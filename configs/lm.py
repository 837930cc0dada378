"""A byte-level language model on the Python standard library's source (`pystdlib/full`).

    python -m experiments.train --config=configs/lm.py --workdir=runs/lm \
        [--config.model.attention=sliding_window]

An edit of configs/train.py: documents (files) are packed into rows of 256 bytes with segment
ids, so no byte attends across files; evaluation reports loss, perplexity and bits per token
(= bits per byte here) on 65536 held-out bytes drawn across many files (at most 1024 from one:
experiments.datasets.pipeline.eval_subset). The sparse variants' options are sized to the
256-byte rows (each sees about a quarter of a row in its local pattern), so that swapping
`model.attention` compares patterns that differ at this length. 1000 steps of 4096 bytes took
13-23 minutes per variant on one core of a 2-core CPU with the other core busy (781-1393 s;
see docs/quality.md for the measured table).
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "pystdlib/full"  # every stdlib .py file, bytes; 5% held out, by package
    c.eval_split = "validation"  # the held-out files
    c.eval_tokens = 65536  # evaluate on this many held-out bytes, from 64 or more files
    c.seq_len = 256  # bytes per packed row
    c.num_steps = 1000  # optimizer steps
    c.batch_size = 16  # rows per step (4096 bytes)
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
    # Local patterns a quarter of a 256-byte row wide.
    c.options.sliding_window.window = 64  # each byte sees the 64 before it (itself included)
    c.options.sliding_window.block_q = 32  # tiles that fit the short rows
    c.options.sliding_window.block_k = 32
    c.options.fixed.block = 64  # 64-byte blocks, each summarised by its last 8 bytes
    c.options.fixed.summary = 8
    c.options.bigbird.block = 16  # 16-byte blocks: window of 3, 2 global, 3 random of 16
    c.options.nsa.block = 16  # 16-byte blocks: the first, 2 local and 1 picked of 16, a
    c.options.nsa.top_k = 4  # 32-byte window and up to 16 compressed tokens (block means)
    c.options.nsa.window = 32
    return c
