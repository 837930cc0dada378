"""Claims: which process of a sweep measures which cell, so several processes (one per core or
device, each running the same command) can share one results folder.

A process claims a cell before measuring it by creating `claims/<hash of the cell's key>.json`
(the cell's fields, its pid and host), atomically: a second process finds the file and moves on.
The claim is removed when the cell's row is written. A claim whose process has died (same host,
no such pid) is what a crash leaves behind: `abandoned()` lists them for the sweep to record.

    claims = Claims(workdir / "claims")
    if claims.take(key, record):   # False: another live process has it
        ...measure, append the row...
        claims.release()
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any


def alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote `record` still runs (on this host; another host's or an
    unnamed process counts as gone: only this host's processes share a folder here)."""
    pid = record.get("pid")
    if record.get("host") != platform.node() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_claim(path: Path) -> dict[str, Any] | None:
    """A claim's record; {} for a file torn by a power loss, None when it is gone."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return {}


class Claims:
    """The claims folder of one results folder; `held` is this process's claim (or None)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.held: Path | None = None

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"

    def take(self, key: str, record: dict[str, Any]) -> bool:
        """Claims cell `key` for this process (True), or finds it claimed (False)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {**record, "pid": os.getpid(), "host": platform.node()}
        draft = self.folder / f".{os.getpid()}.draft"
        draft.write_text(json.dumps(record, default=str))
        try:
            os.link(draft, self.path(key))  # atomic: fails if the claim exists
        except FileExistsError:
            return False
        finally:
            draft.unlink(missing_ok=True)
        self.held = self.path(key)
        return True

    def release(self) -> None:
        """Drops this process's claim (its row is written, or it gave the cell up)."""
        if self.held is not None:
            self.held.unlink(missing_ok=True)
            self.held = None

    def abandoned(self) -> list[tuple[Path, dict[str, Any]]]:
        """Claims whose process is gone, with their records ({} for a torn file)."""
        found = []
        for path in sorted(self.folder.glob("*.json")):
            record = read_claim(path)
            if record is not None and not alive(record):  # None: released meanwhile
                found.append((path, record))
        return found
