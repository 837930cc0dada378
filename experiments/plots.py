"""Figures drawn off-screen, for the reports of sweeps, training runs and evaluations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_figure(make_figure: Callable[[Any], Any], data: Any, path: Path) -> bool:
    """Draws `make_figure(data)` off-screen into `path`; False (and no file) when matplotlib
    is not installed (`pip install scalable-attention[plot]`)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = make_figure(data)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
