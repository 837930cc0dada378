"""Generate from a trained model: the newest checkpoint of a training workdir.

    python -m experiments.sample --workdir=runs/lm --prompt="def " --max_new_tokens=200 \
        --temperature=0.8 [--top_k=40] [--top_p=0.95] [--seed=0] [--num_samples=1]

The workdir's config.json rebuilds the model (its attention variant decodes through its own
cache: KV, window or recurrent); the parameters come from the newest checkpoint. Text models
(byte-level, e.g. `pystdlib`) take and print text; task models (MQAR, ListOps) take and print
comma-separated token ids; an encoder-decoder (trained on `reversal`) takes the source's ids
and prints what its decoder writes, up to its end token. A classifier has nothing to generate
and is refused.
Prints the samples, then the compile time and tokens/s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import checkpoints, datasets
from experiments.datasets.base import TaskBuilder, TaskConfig
from transformer import EncoderDecoder, ModelConfig, TransformerLM
from transformer.sampling import check_request, generate_tokens, write_targets


class NoModel(ValueError):
    """The workdir holds no trained model."""


def _task_config(saved: dict) -> TaskConfig | None:
    """The run's dataset config, where it is a task's (text datasets have none)."""
    name, _, config = saved["dataset"].partition("/")
    configs = datasets.builder_class(name).BUILDER_CONFIGS
    named = [c for c in configs if c.name == config and isinstance(c, TaskConfig)]
    return named[0] if named else None


def is_seq2seq(saved: dict) -> bool:
    """Whether the run trained an EncoderDecoder (its dataset's rows are source-target pairs)."""
    config = _task_config(saved)
    return config is not None and config.is_seq2seq()


def until_end(row: np.ndarray, saved: dict) -> np.ndarray:
    """A decoder's output up to and including its first end token (all of it without one)."""
    config = _task_config(saved)
    end = config.end_token() if config is not None else None
    ends = np.flatnonzero(row == end) if end is not None else []
    return row[: ends[0] + 1] if len(ends) else row


def load(workdir: Path, out: TextIO = sys.stdout) -> tuple[dict, TransformerLM, dict, int]:
    """(saved config, model, params, step) of the newest readable checkpoint in `workdir`
    (the restore path training uses: an unreadable checkpoint falls back to the one before,
    left where it is)."""
    path = workdir / "config.json"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*"))
    if not path.exists() or not steps:
        raise NoModel(
            f"no trained model in {workdir}: train one first, e.g.\n"
            f"  python -m experiments.train --config=configs/lm.py --workdir={workdir}"
            "     (text: --prompt='def ')\n"
            f"  python -m experiments.train --config=configs/mqar.py --workdir={workdir}"
            "   (token ids: --prompt=3,7,100)"
        )
    saved = json.loads(path.read_text())
    model_class = EncoderDecoder if is_seq2seq(saved) else TransformerLM
    model = model_class(ModelConfig(**saved["model"]))
    manager = checkpoints.manager(workdir / "checkpoints")
    try:
        step, state = checkpoints.restore(manager, None, out=out, move_unreadable=False)
    except checkpoints.NoReadableCheckpoint as e:
        raise NoModel(str(e)) from None
    finally:
        manager.close()
    return saved, model, state["params"], step


def is_text(saved: dict) -> bool:
    """Whether the model was trained on bytes of text (else on task token ids)."""
    return not issubclass(datasets.builder_class(saved["dataset"].split("/")[0]), TaskBuilder)


def encode(prompt: str, text: bool, vocab_size: int) -> np.ndarray:
    if text:
        return np.frombuffer(prompt.encode(), np.uint8).astype(np.int32)
    try:
        tokens = np.array([int(t) for t in prompt.split(",")], np.int32)
    except ValueError:
        raise ValueError(f"this model takes comma-separated token ids, got {prompt!r}") from None
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {tokens.tolist()}")
    return tokens


def decode(tokens: np.ndarray, text: bool) -> str:
    if text:
        return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return ",".join(str(t) for t in tokens)


def sample(
    workdir: Path,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    out: TextIO = sys.stdout,
) -> list[str]:
    """Prints and returns `num_samples` continuations of `prompt` (prompt included)."""
    saved, model, params, step = load(workdir, out)
    if model.config.num_classes:
        raise ValueError(f"{workdir} holds a classifier ({model.config.num_classes} classes): "
                         "it labels rows and generates nothing")  # fmt: skip
    text = is_text(saved)
    tokens = encode(prompt, text, model.config.vocab_size)
    batch = jnp.asarray(np.tile(tokens, (num_samples, 1)))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    written = 1 if isinstance(model, EncoderDecoder) else len(tokens)  # the start token
    max_len = check_request(model, written, max_new_tokens, **sampling)
    rng = jax.random.key(seed)
    options = dict(max_new_tokens=max_new_tokens, max_len=max_len, **sampling)
    start = time.perf_counter()
    if isinstance(model, EncoderDecoder):  # the source's words; the targets come out
        compiled = write_targets.lower(model, params, batch, None, rng, **options).compile()
        run = lambda: compiled(params, batch, None, rng)  # noqa: E731
    else:
        compiled = generate_tokens.lower(model, params, batch, rng, prefill_chunk=0,
                                         **options).compile()  # fmt: skip
        run = lambda: compiled(params, batch, rng)  # noqa: E731
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    result = np.asarray(jax.block_until_ready(run()))
    seconds = time.perf_counter() - start
    if isinstance(model, EncoderDecoder):  # a translation ends at its end token
        result = [until_end(row, saved) for row in result]
    samples = [decode(row, text) for row in result]
    for i, s in enumerate(samples):
        print(f"--- sample {i} ({model.config.attention_name}, step {step}) ---\n{s}", file=out)
    rate = num_samples * max_new_tokens / seconds
    print(
        f"--- {num_samples} x {max_new_tokens} tokens in {seconds:.2f} s ({rate:.0f} tokens/s); "
        f"compiled in {compile_s:.1f} s",
        file=out,
    )
    return samples


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a training workdir (config.json and checkpoints/)")
    flags.DEFINE_string("prompt", "", "text, or comma-separated token ids for task models")
    flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate after the prompt")
    flags.DEFINE_float("temperature", 0.8, "softmax temperature; 0: greedy")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
    flags.DEFINE_float("top_p", 1.0, "nucleus: the fewest tokens whose probability reaches p")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("num_samples", 1, "continuations generated together (a batch)")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.ERROR)
    f = flags.FLAGS
    if len(argv) > 1 or f.workdir is None or not f.prompt:
        print("usage: --workdir=<training workdir> --prompt=<text or ids>", file=sys.stderr)
        sys.exit(2)
    try:
        sample(
            Path(f.workdir), f.prompt, max_new_tokens=f.max_new_tokens,
            temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed,
            num_samples=f.num_samples,
        )  # fmt: skip
    except NoModel as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        print(f"invalid request: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
