"""`moba`: Mixture of Block Attention (Lu et al. 2025): each query picks its key blocks by
content.

The keys of each document are split into blocks of `block` positions; a query gates every block
wholly before its own by q . mean(K_block) and attends, causally, to its own block and the
`top_k - 1` highest-gated earlier ones (`top_k` blocks in all, as MoBA's `moba_topk`; all
earlier blocks when there are fewer). The gates carry no gradient. The engine
(`selection.py`) computes the selection first, then only the selected blocks' scores: time and
memory O(T * top_k * block) per head, plus O(T^2 / block) for the gates. Decoding keeps each
block's key sum in the KV cache and gates the cached blocks from them; a generated token then
reads only its top_k blocks: O(S / block + top_k * block) per token and head.
"""

from __future__ import annotations

from attention_variants.families import BlockSelection
from attention_variants.registry import register, spec
from attention_variants.selection import Selection


@register(
    "moba",
    family=BlockSelection(),
    long_context=True,
    test_options=({"block": 4, "top_k": 3, "chunk": 8},),
)
def moba(*, block: int = 64, top_k: int = 3) -> Selection:
    """Blocks of `block` keys; `top_k` of them per query, its own included."""
    return Selection(block, top_k)


# The reference beside the kernel, derived from the declaration above and compared with
# the kernel (output and gradients) by the conformance suite:
# MoBA's brute force (every gate, a dense [T, S] mask, plain softmax).
reference = spec("moba").reference
