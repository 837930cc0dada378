"""ListOps ablation in Long Range Arena's protocol: every variant x learning rate x seed, each
cell a bidirectional encoder classifier trained from scratch; accuracy (over rows) beside the
step time and memory of the cell.

    python -m experiments.sweep --config=configs/ablation_listops.py \
        [--config.variants=dense,linear] [--config.learning_rates=3e-4,1e-3,3e-3] \
        [--config.seeds=0,1,2] [--config.lengths=128,512 --config.min_len=L/8]

A cell takes about 4 minutes on one core here, so the protocol's grid (6 variants x 3 rates x 3
seeds, 54 cells) is about 3.5 hours: give it `--config.time_budget_s=0` (the 30-minute budget
of configs/ablation_mqar.py would skip most cells; a rerun measures the skipped ones) and run
the command once per core into the same --workdir (the processes share the cells).

An edit of configs/ablation_mqar.py (the `train_eval` cell kind): ListOps' classification rows
(`listops` with `classification`, expressions of `min_len` to `max_len` tokens, both an int or
`L/k`, in rows of each length L), a 2-layer encoder of width 64 with an MLP and mean pooling,
AdamW at batch 32 for 1000 steps, evaluated every 250 on the 500 test rows. LRA (Tay et al.
2020, Table 1) trains 6 layers of width 512 for 5000 steps on rows of 2000 tokens; this is the
CPU-sized version of its protocol, and its accuracies are not the paper's.
"""

from configs import ablation_mqar


def get_config():
    c = ablation_mqar.get_config()
    del c.num_pairs  # no MQAR pairs; ListOps' bounds instead:
    c.min_len = "L/8"  # fewest tokens of an expression (16 of a 128-token row)
    c.max_len = "L/1"  # most tokens: the whole row
    c.lengths = "128"  # row lengths L
    c.options.sliding_window.window = (8, 8)  # two-sided in the encoder, 17 keys of 128
    c.options.fixed.block = 32  # 32-token blocks, each summarised by its last 8
    c.options.fixed.summary = 8
    c.options.bigbird.block = 16  # 16-token blocks
    c.causal = False  # the cells' attention runs its non-causal form (as model.causal)
    c.model.causal = False  # an encoder: every token reads the whole expression
    c.model.num_layers = 2  # blocks
    c.model.mlp_dim = 128  # gated MLP width
    c.model.pooling = "mean"  # over the expression's tokens
    c.data.dataset = "listops"  # the TFDS builder, classification rows
    del c.data.vocab  # ListOps' vocabulary is fixed (16 tokens)
    c.data.classification = True  # LRA's form: the answer is the row's label
    c.data.num_train = 20000  # training rows
    c.data.num_test = 500  # held-out rows
    c.train.num_steps = 1000  # AdamW steps
    c.train.warmup_steps = 100  # linear warmup, then cosine decay
    c.learning_rates = "1e-3"  # one cell each; the report keeps the best
    return c
