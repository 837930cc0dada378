"""What code measured a result: recorded in sweep rows and in training workdirs, so that a
result of other code is never taken for this code's."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
CODE = ("attention_variants", "transformer", "experiments", "configs")  # what a row measured


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_version() -> str:
    """The version of the measured code, recorded in each row as `git_commit`: the newest
    commit that changed the code (CODE and setup.cfg; a commit of the docs alone changes
    nothing, so a sweep or run interrupted across it resumes), plus `-dirty+<hash>` of the
    uncommitted changes to the code (edits and new files under CODE) when there are any, so a
    rerun of the same edit resumes and any other edit re-measures. Outside git (or with no
    commit of the code), a hash of the packages' sources."""
    described = (_git("log", "-1", "--format=%h", "--", *CODE, "setup.cfg") or "").strip()
    if not described:
        digest = hashlib.sha1()
        for path in sorted(p for name in CODE for p in (ROOT / name).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
        return f"source-{digest.hexdigest()[:10]}"
    edits = _git("diff", "HEAD", "--", *CODE, "setup.cfg") or ""
    new = (_git("ls-files", "--others", "--exclude-standard", "--", *CODE) or "").split()
    if not edits and not new:
        return described
    digest = hashlib.sha1(edits.encode())
    for name in sorted(new):
        path = ROOT / name
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b""))
    return f"{described}-dirty+{digest.hexdigest()[:10]}"


def versions() -> dict[str, str]:
    """`git_commit` (code_version()) and `jax_version`: the fields that make a result stale."""
    return {"git_commit": code_version(), "jax_version": jax.__version__}
