"""Pluggable attention kernels behind one contract, found by name in one registry.

    import attention_variants as av
    av.names(); fn = av.get("blockwise", block_q=256); av.spec("blockwise").flops(...)
Importing this package registers every variant module below.
"""

from attention_variants import blockwise, dense, xla  # noqa: F401  (registers the variants)
from attention_variants.registry import Spec, get, names, register, spec

__all__ = ["Spec", "get", "names", "register", "spec"]
