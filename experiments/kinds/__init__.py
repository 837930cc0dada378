"""The sweep's cell kinds: each builds, from a cell and the sweep's config, the function the
runner compiles and times (`cells.Built`). A new kind is one module here and one entry in
KINDS and MODES.

- `kernel`: one attention call (`fwd`, `fwd_bwd`);
- `train_step`: the TransformerLM training step (forward, loss, backward, AdamW update);
- `train_eval`: a training step timed, then the real training loop to convergence or a step
  cap and its evaluation: quality beside cost;
- `decode`: the model reading T tokens into its cache (`prefill`) or generating after T.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from experiments.cells import Built, Cell
from experiments.kinds import decode, kernel, train_eval, train_step

KINDS: dict[str, Callable[[Cell, Any], Built]] = {
    "kernel": kernel.build_kernel,
    "train_step": train_step.build_train_step,
    "train_eval": train_eval.build_train_eval,
    "decode": decode.build_decode,
}
MODES: dict[str, tuple[str, ...]] = {
    "kernel": ("fwd", "fwd_bwd"),
    "train_step": ("train_step",),
    "train_eval": ("train_eval",),
    "decode": ("prefill", "decode"),
}
