"""Pathfinder ablation in Long Range Arena's protocol: every variant x learning rate x seed, each
cell a bidirectional encoder classifier trained from scratch on pixel rows; accuracy over the
test images beside the step time and memory of the cell.

    python -m experiments.sweep --config=configs/ablation_pathfinder.py \
        [--config.variants=dense,linear] [--config.learning_rates=3e-4,1e-3,3e-3] \
        [--config.seeds=0,1,2] [--config.time_budget_s=0]

A cell is 2000 steps of 32 images: `dense` took 43 minutes on one core here beside four other
jobs (0.4 s a step beside two), so give the grid `--config.time_budget_s=0` (the 30-minute
budget would skip most cells; a rerun measures the skipped ones) and run the command once per
core into the same --workdir.

An edit of configs/ablation_listops.py (the same 2-layer encoder of width 64 with mean
pooling, AdamW at batch 32) on `pathfinder` rows: images of `data.size` x `data.size` pixels
flattened row by row, so a cell's length L must be `data.size` ** 2 (the default, 16 x 16 and
no distractor path, is `pathfinder/pathfinder16`). The sparse options are those of
configs/lra_pathfinder.py: a window of a pixel row either side, a block per pixel row. Chance
is 0.5 (the builder draws both labels equally often). LRA's Pathfinder-32, for an
accelerator, with the options sized to its rows of 32 pixels:

    --config.lengths=1024 --config.data.size=32 --config.data.segments=5 \
    --config.data.distractors=2 "--config.options.sliding_window.window=(32, 32)" \
    --config.options.sliding_window.block_q=32 --config.options.sliding_window.block_k=32 \
    --config.options.fixed.block=32 --config.options.bigbird.block=32
"""

from configs import ablation_listops, lra_pathfinder


def get_config():
    c = ablation_listops.get_config()
    image = lra_pathfinder.get_config()
    del c.min_len, c.max_len  # no expression bounds: an image fills its row
    c.lengths = "256"  # pixels per row: data.size ** 2
    for name in ("sliding_window", "fixed", "bigbird"):  # sized to a pixel row of 16
        c.options[name].update(image.options[name].to_dict())
    c.data.dataset = "pathfinder"  # the TFDS builder (pathfinder16's drawing below)
    del c.data.classification  # every pathfinder row is a classification row
    c.data.size = 16  # image side
    c.data.segments = 3  # dashes per path
    c.data.distractors = 0  # paths without dots
    c.data.num_test = 1000  # held-out images
    c.train.num_steps = 2000  # AdamW steps
    return c
