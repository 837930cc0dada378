"""Interleaved A/B of the kernels of two trees: this checkout against another one (`--old`).

    python -m experiments.ab --old=/path/to/other/checkout \
        [--variants=blockwise,sliding_window] [--lengths=4096,16384] [--modes=fwd,fwd_bwd] \
        [--documents=4]

The other tree's `attention_variants` is imported under another name (a copy with its imports
renamed, in a temporary folder), so both run in one process on the same machine state; for each
(variant, length, mode) both are compiled, then called alternately `--repeats` times each, and
the medians compared (drift between runs minutes apart is larger than the changes worth
measuring on a shared VM). Shapes as the default sweep: float32, B=1, N=K=8, H=64, causal,
default options; `--documents=n` packs n equal documents into each row (segment ids). Prints
a Markdown table with new/old.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import attention_variants as new_av

OLD = "old_attention_variants"


def import_old(checkout: str):
    """The other checkout's attention_variants, imported as OLD (a renamed copy)."""
    src = pathlib.Path(checkout) / "attention_variants"
    if not src.is_dir():
        raise SystemExit(f"--old={checkout}: no attention_variants folder there")
    dst = pathlib.Path(tempfile.mkdtemp()) / OLD
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.rglob("*.py"):
        f.write_text(f.read_text().replace("attention_variants", OLD))
    sys.path.insert(0, str(dst.parent))
    return importlib.import_module(OLD)


def step(av, name: str, mode: str, ids):
    fn = av.get(name)
    if mode == "fwd":
        return jax.jit(lambda q, k, v: fn(q, k, v, causal=True, segment_ids=ids))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, causal=True, segment_ids=ids))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="path of the other checkout")
    p.add_argument("--variants", default="blockwise,sliding_window,fixed,bigbird,linear")
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--documents", type=int, default=1, help="equal documents packed per row")
    args = p.parse_args(argv)
    old_av = import_old(args.old)
    print("| variant | T | mode | old ms | new ms | new/old | compile old s | compile new s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        for T in map(int, args.lengths.split(",")):
            q, k, v = (jax.random.normal(jax.random.key(i), (1, T, 8, 64)) for i in range(3))
            ids = None
            if args.documents > 1:
                ids = (jnp.arange(T)[None] * args.documents // T).astype(jnp.int32)
            for mode in args.modes.split(","):
                fns, compile_s, times = {}, {}, {"old": [], "new": []}
                for tree, av in (("old", old_av), ("new", new_av)):
                    start = time.perf_counter()
                    fns[tree] = step(av, name, mode, ids).lower(q, k, v).compile()
                    jax.block_until_ready(fns[tree](q, k, v))
                    compile_s[tree] = time.perf_counter() - start
                for _ in range(args.repeats):
                    for tree in ("old", "new"):
                        start = time.perf_counter()
                        jax.block_until_ready(fns[tree](q, k, v))
                        times[tree].append(1e3 * (time.perf_counter() - start))
                old, new = (statistics.median(times[t]) for t in ("old", "new"))
                print(f"| {name} | {T} | {mode} | {old:.1f} | {new:.1f} | {new / old:.2f} | "
                      f"{compile_s['old']:.1f} | {compile_s['new']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
