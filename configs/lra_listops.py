"""ListOps in Long Range Arena's protocol (Tay et al. 2020): a bidirectional encoder reads the
whole expression, pools it, and classifies its value (10 classes): `listops/classify-short`.

    python -m experiments.train --config=configs/lra_listops.py --workdir=runs/lra_listops \
        [--config.model.attention=sliding_window]

An edit of configs/train.py. The default is CPU-sized: expressions of 20-128 tokens, a 4-layer
encoder of width 128 with mean pooling, 1500 steps of 32 rows (about 20 minutes on a 2-core
CPU; docs/quality.md has the measured times). The sparse variants' options are sized to the
128-token rows; `sliding_window` is two-sided in an encoder only when its window is a
(left, right) pair (an int W is W keys back). LRA's setting, for an accelerator:

    --config.dataset=listops/classify-lra --config.num_steps=5000 --config.warmup_steps=1000 \
    --config.model.num_layers=6 --config.model.num_heads=8 --config.model.num_kv_heads=8 \
    --config.model.head_dim=64 --config.model.mlp_dim=2048 --config.model.pooling=cls \
    --config.model.positions=learned

(LRA: 512 wide, 8 heads, MLP 2048, 6 layers, batch 32, 5000 steps, a CLS token, learned
positions; its optimizer, Adafactor-style rsqrt decay at rate 0.05, is not reproduced: AdamW
with this project's warmup-cosine schedule is, at the rate its sweep picks.)
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "listops/classify-short"  # 20-128 tokens, 20000 train / 200 test rows
    c.num_steps = 1500  # optimizer steps
    c.batch_size = 32  # rows per step
    c.learning_rate = 1e-3  # peak learning rate
    c.warmup_steps = 200  # linear warmup
    c.eval_every = 500  # evaluate on the test rows
    c.checkpoint_every = 500  # steps between checkpoints
    c.model.causal = False  # an encoder: every position reads the whole expression
    c.model.pooling = "mean"  # over the expression's tokens (its padding excluded)
    c.model.num_layers = 4  # Transformer blocks
    c.model.num_heads = 4  # N
    c.model.num_kv_heads = 4  # K
    c.model.head_dim = 32  # H (width 128)
    c.model.mlp_dim = 256  # gated MLP width
    # Local patterns sized to the 128-token rows (each sees about a quarter of a row).
    c.options.sliding_window.window = (16, 16)  # 16 keys either side, the query itself too
    c.options.sliding_window.block_q = 16
    c.options.sliding_window.block_k = 16
    c.options.fixed.block = 32  # 32-token blocks, each summarised by its last 8
    c.options.fixed.summary = 8
    c.options.bigbird.block = 16  # 16-token blocks
    return c
