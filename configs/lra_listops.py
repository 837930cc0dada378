"""ListOps in Long Range Arena's protocol (Tay et al. 2020): a bidirectional encoder reads the
whole expression, pools it, and classifies its value (10 classes): `listops/classify-short`.

    python -m experiments.train --config=configs/lra_listops.py --workdir=runs/lra_listops \
        [--config.model.attention=sliding_window]

An edit of configs/listops.py. The default is CPU-sized: expressions of 20-128 tokens, a 4-layer
encoder of width 128 with mean pooling, 1500 steps of 32 rows: 20 minutes on a 2-core CPU
(0.78 s a step for `dense`, measured with another training job on the second core). The sparse variants' options are sized to the
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

from configs import listops


def get_config():
    c = listops.get_config()  # its optimizer, batch and 4-layer model of width 128
    c.dataset = "listops/classify-short"  # 20-128 tokens, 20000 train / 200 test rows
    c.num_steps = 1500  # optimizer steps
    c.model.num_kv_heads = 4  # full multi-head attention, as LRA's
    c.model.causal = False  # an encoder: every position reads the whole expression
    c.model.pooling = "mean"  # over the expression's tokens (its padding excluded)
    # Local patterns sized to the 128-token rows (each sees about a quarter of a row).
    c.options.sliding_window.window = (16, 16)  # 16 keys either side, the query itself too
    c.options.sliding_window.block_q = 16
    c.options.sliding_window.block_k = 16
    c.options.fixed.block = 32  # 32-token blocks, each summarised by its last 8
    c.options.fixed.summary = 8
    c.options.bigbird.block = 16  # 16-token blocks
    return c
