"""ListOps (Long Range Arena's task), `listops/short`: expressions of 20-128 tokens.

    python -m experiments.train --config=configs/listops.py --workdir=runs/listops \
        [--config.dataset=listops/lra --config.model.attention=blockwise]

An edit of configs/train.py: the answer digit is predicted at the last token of the expression
(next-token prediction, so the one TransformerLM serves), with a 4-layer model with an MLP.
`listops/lra` (500-2000 tokens, 96000 rows) is the paper's setting, for an accelerator.
"""

from configs import train


def get_config():
    c = train.get_config()
    c.dataset = "listops/short"  # 20-128 tokens, 20000 train / 200 test rows
    c.num_steps = 3000  # optimizer steps
    c.batch_size = 32  # rows per step
    c.learning_rate = 1e-3  # peak learning rate
    c.warmup_steps = 200  # linear warmup
    c.eval_every = 500  # evaluate on the test rows
    c.checkpoint_every = 500  # steps between checkpoints
    c.model.num_layers = 4  # Transformer blocks
    c.model.num_heads = 4  # N
    c.model.head_dim = 32  # H (width 128)
    c.model.mlp_dim = 256  # gated MLP width
    return c
