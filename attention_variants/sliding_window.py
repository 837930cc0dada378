"""`sliding_window`: each query sees the keys within a window around it.

Local attention as in Longformer (Beltagy et al. 2020) and Mistral 7B (Jiang et al. 2023): exact
softmax under `Window(left, right)`: query i sees key j iff i - left <= j <= i + right (and
j <= i when causal, which clips the right side to 0). `window` is that pair, or an int W meaning
(W - 1, 0): the last W keys, the query itself included, whether causal or not. The shared tile
engine (`tiled.py`) computes only the band of tiles around the diagonal, so time and memory are
O(T * (left + right)); the window depends on k - i only, so packed rows keep the band.

`sinks=n` also shows every query the first n keys of its document (StreamingLLM's attention
sinks, Xiao et al. 2023): the mask `Window | Sinks`. Its tiles are the band plus the first key
tiles; packed rows run the pattern per document (positions within it). Decoding keeps the n
sinks and the last W - 1 keys: O(W + n) memory however long the generation.
"""

from __future__ import annotations

from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Mask, Sinks, Window, window_extent
from attention_variants.registry import register, spec
from attention_variants.tiled import BlockSizes

WINDOW = 512

# Small tiles fit a narrow band best: 64 x 64 was fastest for window=512 on a 2-core CPU
# (T=16384: 0.33 s against 0.45 s at 256 x 256 and 0.54 s at 512 x 512).


@register(
    "sliding_window",
    family=MaskedSoftmax(tiles=BlockSizes(64, 64)),
    long_context=True,
    test_options=(
        {"window": (19, 4), "block_q": 16, "block_k": 8},
        {"window": 8, "block_q": 8, "block_k": 8},
        {"window": (4, 0), "block_q": 4, "block_k": 16},
        {"window": 5, "sinks": 3, "block_q": 8, "block_k": 4},
    ),
)
def sliding_window(*, causal: bool, window=WINDOW, sinks: int = 0) -> Mask:
    """The window (left, right) of `window` (causal clips its right side to 0), or with `sinks`
    the window or the first `sinks` keys of the document."""
    left, right = window_extent("window", window)
    band = Window(left, 0 if causal else right)
    return band | Sinks(sinks, causal) if sinks != 0 else band


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised window mask.
reference = spec("sliding_window").reference
