"""`nsa`: Native Sparse Attention (Yuan et al. 2025, DeepSeek): three branches, gated per token.

With the keys of each document in blocks of `block` positions, query t's output is

    o_t = g_cmp * Attn(q_t, compressed) + g_slc * Attn(q_t, selected) + g_win * Attn(q_t, window)

* compressed: one key and value per whole block that ends at or before t, phi(K_block) and
  phi(V_block) with phi the mean (the paper's phi is a learned MLP over the block; mean
  pooling is flash-linear-attention's NSA);
* selected: the keys of `top_k` blocks, causal: the document's first `initial` blocks and
  the `local` blocks ending with t's own always, the others ranked by the compressed branch's
  probabilities summed over the query heads of each key/value head (the paper's GQA-shared
  selection); the selection carries no gradient;
* window: the last `window` keys, t's own included.

The gates g [B, T, N, 3] in [0, 1] are the call argument `branch_gates` (the model learns
them, sigmoid(x W), `transformer/mixers.py`; None: 1/2 each). The paper's compression blocks
(l = 32, stride d = 16) and selection blocks (l' = 64) differ; here l = d = l' = `block`, the
case in which the paper reads the selection scores straight off the compressed branch. The
three branches share the layer's keys and values (the paper gives each branch its own, against
shortcut learning between the local and the long-range branches); an ablation of that needs
per-branch projections in the model's layer.
Defaults as the paper's selection: block 64, top_k 16 (1 initial, 2 local), window 512.

The engine (`selection.branched_attention`): MoBA's selected-block tiles for the selected
branch, chunks of queries scored against the block means for the compressed one, the tiled
engine's band for the window.
Decoding keeps each block's key and value sums beside the KV cache: a generated token scores
the blocks from them and reads only its top_k blocks and its window.
"""

from __future__ import annotations

from attention_variants.families import BlockSelection
from attention_variants.registry import register, spec
from attention_variants.selection import Selection


@register(
    "nsa",
    family=BlockSelection(branches=True),
    long_context=True,
    test_options=({"block": 4, "top_k": 4, "window": 6, "chunk": 8},),
)
def nsa(*, block: int = 64, top_k: int = 16, window: int = 512, initial: int = 1,
        local: int = 2) -> Selection:  # fmt: skip
    """Blocks of `block` keys; `top_k` selected per query (`initial` first and `local` last
    always); a window of `window` keys."""
    return Selection(block, top_k, initial, local, scoring="compressed", window=window)


# The reference beside the kernel, derived from the declaration above and compared with the
# kernel (output and gradients) by the conformance suite and tests/test_nsa.py: the branches
# under dense [T, S] masks, every block scored.
reference = spec("nsa").reference
