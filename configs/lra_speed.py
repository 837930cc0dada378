"""Long Range Arena speed/memory setting (Tay et al. 2020, Table 2) on the model sweep.

    python -m experiments.sweep --config=configs/lra_speed.py

LRA's efficiency benchmark: the byte-level text classification model (6 layers, 8 heads,
width 512, FFN 2048, byte vocabulary), batch 32, lengths 1K-4K; steps/s and peak memory of each
variant relative to the vanilla Transformer. Our report's LRA table shows steps/s and XLA's
compiled memory of the step (the runtime peak is results.csv `peak_bytes`), relative to `xla`
(jax.nn.dot_product_attention, like the Flax dot-product attention LRA's Transformer used).
An edit of configs/model_sweep.py.
At batch 32 one 4K step is ~20 TFLOP, minutes on a 2-core CPU: run it on a GPU/TPU, or on
a CPU with `--config.batch=1 --config.model.num_layers=2` as docs/lra_speed.md did. Our model
is a causal decoder LM with a gated MLP, not LRA's bidirectional encoder with a [CLS] head
(docs/lra_speed.md lists the differences).
"""

from configs import model_sweep


def get_config():
    c = model_sweep.get_config()
    c.variants = "all"  # every registered variant (LRA compared ten)
    c.baselines = "xla"  # the vanilla Transformer: speed-ups are relative to it
    c.lengths = "1024,2048,3072,4096"  # LRA Table 2's lengths
    c.batch = 32  # LRA's batch size
    c.heads = 8  # LRA text: 8 heads
    c.kv_heads = 8  # no GQA in LRA
    c.head_dim = 64  # width 512 = 8 x 64
    c.model.num_layers = 6  # LRA text: 6 layers
    c.model.mlp_dim = 2048  # LRA text: FFN 2048 (ours is gated: 3 matrices instead of 2)
    c.model.vocab_size = 256  # bytes
    c.max_call_s = 600.0  # a step may be slow; the sweep still stops a variant beyond this
    c.time_budget_s = 0.0  # no whole-sweep budget
    return c
