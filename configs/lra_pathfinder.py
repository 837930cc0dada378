"""Pathfinder in Long Range Arena's protocol: a bidirectional encoder reads an image pixel by
pixel, pools it, and says whether its two dots are joined by one dashed path; generated here
(experiments/datasets/pathfinder.py). The default, `pathfinder/pathfinder16` (16 x 16: 256
tokens, two paths), is CPU-sized; LRA's size, `--config.dataset=pathfinder/pathfinder32`
(1024 tokens, two distractor paths), is for an accelerator. Measured on a 2-core CPU shared
with two other training jobs: a step of 32 images took 4.6 s at 16 x 16 (2000 steps: about
2.5 hours) and 45 s at 32 x 32.

    python -m experiments.train --config=configs/lra_pathfinder.py --workdir=runs/pathfinder \
        [--config.model.attention=sliding_window]

An edit of configs/lra_listops.py (the same encoder classifier, its sparse options sized to
the image: a window of a pixel row either side, a block per row). The first run draws the
21000 images (pathfinder16: about 3 minutes; pathfinder32: 5).
"""

from configs import lra_listops


def get_config():
    c = lra_listops.get_config()
    c.dataset = "pathfinder/pathfinder16"  # 16 x 16 images, 20000 train / 1000 test
    c.num_steps = 2000  # optimizer steps
    c.eval_every = 500  # evaluate on the test images
    c.checkpoint_every = 250  # steps between checkpoints
    c.options.sliding_window.window = (16, 16)  # the pixel rows above and below (16 x 16)
    c.options.fixed.block = 16  # a pixel row per block, summarised by its last 4
    c.options.fixed.summary = 4
    c.options.bigbird.block = 16  # 16-token blocks
    return c
