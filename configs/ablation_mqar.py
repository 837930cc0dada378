"""MQAR ablation: every variant x context length x number of key-value pairs x learning rate x
seed, each cell a fresh training run; accuracy beside the step time and memory of the cell.

    python -m experiments.sweep --config=configs/ablation_mqar.py \
        [--config.variants=dense,linear] [--config.lengths=64,128] [--config.num_pairs=4,L/8] \
        [--config.learning_rates=1e-3,3e-3,1e-2] [--config.seeds=0,1,2] \
        [--config.train.threshold=0.99] [--config.extrapolate=2,4]

An edit of configs/context_sweep.py with the `train_eval` cell kind (experiments/kinds/):
Zoology's MQAR model (2 attention-only layers, width 64 = 2 heads x 32, RoPE) on MQAR rows of
length L with N pairs, trained by experiments.train's loop (`train.*`: configs/train.py's
fields) at batch 32, evaluated every `train.eval_every` steps on 500 held-out rows (the logits
at the N queries only), stopped at `train.threshold` or the step cap. Pairs that do not fit a
length (4N > L) are left out. The report keeps each variant's best rate per cell (the mean over
seeds) with the spread. To finish within 30 minutes on a 2-core CPU the default grid is one
length (L = 64; N = 4, 8, 16; 6 variants; one rate, one seed: 18 cells of about 80 s) with a
vocabulary of 512 instead of Zoology's 8192 and a 3000-step cap on 20000 rows;
`time_budget_s` skips cells that would overrun. configs/zoology_mqar.py is the protocol run.
"""

import ml_collections

from configs import context_sweep, train


def get_config():
    c = context_sweep.get_config()
    c.kind = "train_eval"  # each cell: time one training step, then train and evaluate
    c.modes = "train_eval"  # the only mode of this kind
    # dense, blockwise and xla compute the same function (equal to float rounding): dense
    # stands for the three; --config.variants=all runs every registered variant.
    c.variants = "dense,sliding_window,fixed,bigbird,linear,performer"
    c.baselines = "dense"  # the vanilla Transformer first
    c.lengths = "64"  # MQAR row lengths L (e.g. 64,128,256 with more time)
    c.num_pairs = "4,8,16"  # key-value pairs N per row (cells with 4N > L are left out)
    c.batch = 32  # rows per training step
    c.heads = 2  # N heads (width 64)
    c.kv_heads = 2  # K
    c.head_dim = 32  # H
    c.options.sliding_window.window = 16  # a window shorter than the rows (16 of 64-128)
    c.options.sliding_window.block_q = 16  # tiles that fit the short rows
    c.options.sliding_window.block_k = 16
    c.options.fixed.block = 16  # fixed: 16-token blocks, 4 summary tokens
    c.options.fixed.summary = 4
    c.options.bigbird.block = 8  # bigbird: 8-token blocks
    c.model = ml_collections.ConfigDict()  # the rest of transformer.ModelConfig
    c.model.num_layers = 2  # attention-only blocks, as Zoology's MQAR model
    c.model.mlp_dim = 0  # no MLP
    c.model.positions = "rope"  # rope | learned | sinusoidal | none
    c.model.param_dtype = "float32"  # parameters and optimizer state
    c.model.variant_layer = True  # each variant's own layer (False: plain projections for all)
    c.data = ml_collections.ConfigDict()  # the dataset of every cell (length and N per cell)
    c.data.dataset = "mqar"  # the TFDS builder
    c.data.vocab = 512  # V > L (Zoology: 8192; 512 keeps the logits affordable on a CPU)
    c.data.num_train = 20000  # training rows
    c.data.num_test = 500  # held-out rows
    c.data.seed = 0  # dataset seed
    c.seeds = "0"  # training seeds (parameters, data order): one cell each, e.g. 0,1,2
    c.learning_rates = "3e-3"  # peak learning rates: one cell each; the report keeps the best
    c.extrapolate = ""  # e.g. "2,4": also test each trained model at 2L and 4L (more pairs)
    c.train = train.get_config()  # the training of every cell (configs/train.py's fields)
    for per_cell in ("dataset", "seed", "learning_rate", "batch_size"):  # the sweep's axes
        del c.train[per_cell]
    c.train.num_steps = 3000  # AdamW step cap (about 70 s per cell here)
    c.train.warmup_steps = 50  # linear warmup, then cosine decay
    c.train.eval_every = 250  # evaluate on the held-out rows every this many steps
    c.train.threshold = 0.0  # stop a cell once its accuracy reaches this (0: run the cap)
    c.train.checkpoint_every = 1000  # a killed sweep resumes the cell from here
    c.cell_budget_s = 1.0  # seconds of timed training steps per cell
    c.max_call_s = 10.0  # a step slower than this is not trained
    c.time_budget_s = 1800.0  # whole-grid budget (s)
    return c
