"""Pluggable attention kernels behind one contract, found by name in one registry.

    import attention_variants as av
    av.names(); fn = av.get("blockwise", block_q=256); av.spec("blockwise").flops(...)
    dec = av.decoder("sliding_window"); cache = dec.init(B, max_len, K, H)
    out, cache = dec.extend(cache, q, k, v, position)   # decode t tokens at `position`

Importing this package imports every public module in it, so a new variant is one file with
one `@register(...)` decorator: nothing else to edit.
"""

import importlib
import pkgutil

from attention_variants.decoding import cache_bytes, decoder
from attention_variants.registry import Layer, Spec, get, names, register, spec

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Layer", "Spec", "cache_bytes", "decoder", "get", "names", "register", "spec"]
