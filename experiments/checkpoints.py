"""Checkpoints of a training workdir: saving, and the one restore path that training, sampling
and evaluation share.

A checkpoint is *unreadable* when it cannot be read on its own terms (missing or partial files,
a checksum or deserialisation error): restoring it without a target fails with a read error
(READ_ERRORS). Only then does
restore fall back to the one before. Any other failure (out of memory, a model that no longer
matches the saved parameters) is raised as RestoreError naming the step, and nothing is moved.
When no checkpoint can be read, NoReadableCheckpoint is raised and nothing is moved either:
the user decides what to do with them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import grain
import orbax.checkpoint as ocp


class RestoreError(RuntimeError):
    """A readable checkpoint that could not be restored into this run (not corruption)."""


class NoReadableCheckpoint(RuntimeError):
    """Every checkpoint of the workdir is unreadable; none was moved."""


def manager(directory: Path, keep: int | None = None) -> ocp.CheckpointManager:
    """The orbax manager of `directory` (items `state` and `data`), keeping `keep` newest."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory.resolve(), options=options, item_names=("state", "data"))


def _args(abstract: Any, data: Any) -> ocp.args.Composite:
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data)
    return ocp.args.Composite(**items)


# What reading a damaged checkpoint raises (missing or partial files, a checksum or
# deserialisation error): JSONDecodeError and tensorstore's errors are ValueErrors,
# FileNotFoundError an OSError, a missing item a KeyError. Anything else (MemoryError, a
# runtime error of the devices) is not the checkpoint's fault and is raised.
READ_ERRORS = (ValueError, KeyError, OSError, EOFError)


def _readable(manager_: ocp.CheckpointManager, step: int, data: Any) -> bool:
    """Whether checkpoint `step` reads without a target (as saved: host arrays); an error
    that is not a read error is raised."""
    try:
        manager_.restore(step, args=_args(None, data))
    except READ_ERRORS:
        return False
    return True


def restore(
    manager_: ocp.CheckpointManager,
    abstract: Any,
    data: Any = None,
    out: TextIO = sys.stdout,
    move_unreadable: bool = True,
) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, restored into `abstract` (None: as
    saved) with the iterator `data` set to its position; None when there is no checkpoint.

    Unreadable newer checkpoints are skipped with a warning and, once an older one has been
    restored and `move_unreadable`, moved to <workdir>/corrupt/<step> (a resumed run would
    save over their steps). Raises RestoreError for a readable checkpoint that fails to
    restore, NoReadableCheckpoint when none can be read; neither moves anything."""
    directory = Path(manager_.directory)
    unreadable: list[int] = []
    for step in sorted(manager_.all_steps(), reverse=True):
        try:
            state = manager_.restore(step, args=_args(abstract, data)).state
        except Exception as e:  # noqa: BLE001  (sorted below: unreadable, or raised)
            if _readable(manager_, step, data):
                raise RestoreError(
                    f"checkpoint {step} in {directory} is readable but does not restore into "
                    f"this run ({type(e).__name__}: {str(e)[:500]}); nothing was moved"
                ) from e
            print(
                f"warning: checkpoint {step} is unreadable ({type(e).__name__}: "
                f"{str(e)[:200]}); trying the one before",
                file=out,
            )
            unreadable.append(step)
            continue
        if move_unreadable:
            for bad in unreadable:
                corrupt = directory.parent / "corrupt" / str(bad)
                corrupt.parent.mkdir(exist_ok=True)
                shutil.move(str(directory / str(bad)), corrupt)
                print(f"moved unreadable checkpoint {bad} to {corrupt}", file=out)
            manager_.reload()
        return step, state
    if unreadable:
        raise NoReadableCheckpoint(
            f"no checkpoint in {directory} can be read (steps {unreadable}); nothing was moved. "
            "Repair or remove them, or train into another --workdir."
        )
    return None


def save(manager_: ocp.CheckpointManager, state: Any, data: Any) -> None:
    """Saves `state` and the iterator's position at state["step"], and waits for it."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data)
    )
    manager_.save(int(state["step"]), args=args)
    manager_.wait_until_finished()
