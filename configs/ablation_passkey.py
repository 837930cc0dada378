"""Passkey ablation: every variant x learning rate x seed, each cell the passkey model of
configs/passkey.py trained from scratch; digit accuracy on the held-out rows beside the step
time and memory of the cell.

    python -m experiments.sweep --config=configs/ablation_passkey.py \
        [--config.variants=dense,sliding_window,moba] [--config.learning_rates=1e-3,3e-3] \
        [--config.seeds=0,1,2] [--config.train.threshold=0.99] [--config.lengths=256]

A cell is up to 2000 steps of 32 rows of 256 tokens: 4-17 minutes on one core here, so the
protocol's grid takes hours. Give it `--config.time_budget_s=0` (the 30-minute budget would
skip most cells; a rerun measures the skipped ones) and run the command once per core into the
same --workdir (the processes share the cells). The needle's depth is random per row; the
per-(depth, length) grid of one trained model is experiments.evaluate's (docs/quality.md).

An edit of configs/ablation_mqar.py (the `train_eval` cell kind): `passkey` rows of L tokens
(the paper's repeated filler sentence, a 5-digit key at a random depth, the query at the end;
20000 train / 500 test rows as `passkey/short`) and configs/passkey.py's model and training
(2 attention-only layers of 2 heads x 32, RoPE, AdamW at batch 32 for 2000 steps). The window
is 64 keys, the reach of `moba` with blocks of 32 and top_k 2 (its own block and one picked).
"""

from configs import ablation_mqar, passkey


def get_config():
    c = ablation_mqar.get_config()
    single = passkey.get_config()
    del c.num_pairs  # no task axis: the needle's depth is random per row
    c.variants = "dense,sliding_window,moba,linear"
    c.lengths = "256"  # row lengths L (passkey/short's)
    c.batch = single.batch_size  # rows per training step
    c.heads = single.model.num_heads  # configs/passkey.py's model
    c.kv_heads = single.model.num_kv_heads
    c.head_dim = single.model.head_dim
    for name in ("num_layers", "mlp_dim", "positions"):
        c.model[name] = single.model[name]
    c.options.sliding_window.window = 64  # two layers reach 126 tokens back
    c.options.sliding_window.block_q = 32  # tiles of the window's size
    c.options.sliding_window.block_k = 32
    c.options.moba.block = 32  # each query: its own block and the best-matching earlier one
    c.options.moba.top_k = 2
    c.data.dataset = "passkey"  # the TFDS builder
    del c.data.vocab  # passkey's vocabulary is fixed (digits, markers, filler)
    c.data.num_train = 20000  # training rows
    c.data.num_test = 500  # held-out rows
    c.train.num_steps = single.num_steps  # AdamW step cap
    c.train.warmup_steps = single.warmup_steps  # linear warmup, then cosine decay
    c.train.eval_every = single.eval_every  # evaluate on the held-out rows
    c.learning_rates = "1e-3"  # configs/passkey.py's; one cell each, the report keeps the best
    return c
