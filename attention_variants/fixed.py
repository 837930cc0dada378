"""`fixed`: the Sparse Transformer "fixed" pattern (Child et al. 2019).

Positions (within the document) fall in blocks of `block`; query i sees every key of its own
block (A1) plus the last `summary` positions of every block (A2, the "summary" cells that carry
information across blocks); causal adds j <= i. Exact softmax under `masks.Fixed` through the
shared tile engine. Unpacked, query tiles are the blocks and key tiles the smallest divisor of
the block that holds its summary (at least 8 wide), so only visible tiles run and the
off-diagonal ones are summary keys: each query sees ~block + (i / block) * summary keys, so the
cost is O(T^2 * summary / block), quadratic with a small constant as in the paper. Packed rows
run the causal band of (default) tiles with the pattern applied per element.
"""

from __future__ import annotations

from attention_variants.families import MaskedSoftmax
from attention_variants.masks import Fixed
from attention_variants.registry import register, spec

BLOCK, SUMMARY = 128, 16  # the paper's l=128 with c in {8, 16, 32}


@register(
    "fixed",
    family=MaskedSoftmax(tiles="auto"),
    test_options=(
        {"block": 8, "summary": 2},
        {"block": 4, "summary": 1, "block_q": 8, "block_k": 4},
        {"block": 16, "summary": 3, "block_q": 8, "block_k": 8},
        {"block": 8, "summary": 8},
        {"block": 16, "summary": 15},
    ),
)
def fixed(*, causal: bool, block=BLOCK, summary=SUMMARY) -> Fixed:
    """The fixed pattern with blocks of `block` and `summary` summary positions per block."""
    return Fixed(block, summary, causal)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# plain softmax under the materialised fixed-pattern mask.
reference = spec("fixed").reference
