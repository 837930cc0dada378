"""Training: the base that configs/mqar.py, configs/listops.py and configs/lm.py edit.

    python -m experiments.train --config=configs/train.py --workdir=runs/mqar_small \
        [--config.model.attention=linear] [--config.num_steps=500]

Trains the TransformerLM on a TFDS dataset of the project (built on first use into
`data_dir`), with the loss on the dataset's weighted positions only; see experiments/train.py
for what it writes. This base trains a tiny model on `mqar/small` in about 30 s on a 2-core CPU
(28 s measured, the dataset's first build included): a smoke test, not a result.
"""

import ml_collections

from experiments.configlib import registered_options


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "mqar/small"  # TFDS name/config of a project dataset (experiments/datasets)
    c.data_dir = ""  # where datasets are built and read; "": TFDS_DATA_DIR or TFDS's default
    c.eval_split = "test"  # the held-out split evaluated every eval_every steps
    c.seq_len = 0  # text datasets: row length of packed documents; 0: model.max_len
    c.num_steps = 300  # optimizer steps
    c.batch_size = 32  # rows per step
    c.learning_rate = 1e-3  # peak AdamW learning rate
    c.warmup_steps = 30  # linear warmup from 0, then cosine decay to 0 at num_steps
    c.weight_decay = 0.1  # AdamW decoupled weight decay
    c.grad_clip = 1.0  # global-norm gradient clipping (0: none)
    c.eval_every = 100  # evaluate every this many steps (and at the end)
    c.eval_examples = 0  # evaluate on at most this many held-out examples (0: all)
    c.eval_tokens = 0  # text: evaluate on this many held-out tokens drawn across files (0: all)
    c.threshold = 0.0  # stop once threshold_metric reaches this at an evaluation (0: never)
    c.threshold_metric = "eval/accuracy"  # the metric `threshold` applies to
    c.log_every = 10  # training metrics every this many steps
    c.checkpoint_every = 100  # save a checkpoint every this many steps (and at the end)
    c.keep = 3  # checkpoints kept (the newest)
    c.seed = 0  # parameters, data order and dropout
    # > 0: model.<match_field> set per model so that its parameter count comes closest to this
    # budget (transformer/budget.py): variants' own layers differ in size
    c.match_params = 0
    c.match_field = "head_dim"  # head_dim (with embed_dim unset, the width too) | mlp_dim
    # Devices: data x seq must be the device count (0: what the other axis leaves). Rows split
    # over `data`, positions over `seq`; model.attention="ring" rings over `seq` (README).
    c.mesh = ml_collections.ConfigDict(dict(data=0, seq=1))
    # Every registered variant's options; the model uses those of model.attention, e.g.
    # --config.model.attention=sliding_window --config.options.sliding_window.window=32
    c.options = registered_options()
    c.model = ml_collections.ConfigDict()  # transformer.ModelConfig fields
    c.model.vocab_size = 0  # 0: the dataset's vocabulary
    c.model.num_layers = 2  # Transformer blocks
    c.model.num_heads = 2  # query heads N
    c.model.num_kv_heads = 2  # key/value heads K
    c.model.head_dim = 32  # H (width D = N * H)
    c.model.mlp_dim = 0  # gated MLP width (0: attention-only blocks, as Zoology's MQAR model)
    c.model.max_len = 0  # 0: the dataset's row length
    c.model.attention = "dense"  # the attention variant (registry name)
    c.model.positions = "rope"  # rope | learned | sinusoidal | none
    c.model.norm = "rms"  # rms | layer
    c.model.dropout_rate = 0.0  # dropout after attention and MLP
    c.model.dtype = "float32"  # activation dtype
    c.model.variant_layer = True  # the variant's own layer (False: plain projections for all)
    c.model.attention_sinks = False  # a learned sink logit per head and layer (masked softmax)
    c.model.causal = True  # False: a bidirectional encoder (variants' non-causal forms)
    c.model.num_classes = 0  # the dataset's: > 0 for a classification dataset (LRA's protocol)
    c.model.pooling = "mean"  # a classifier's pooling: mean over real tokens | cls (a CLS vector)
    return c
