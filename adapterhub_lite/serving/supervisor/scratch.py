"""Private temp folders for the processes a run starts (vLLM, Ray), removed at stop, pruned when stale.

vLLM and Ray write into `$TMPDIR`: vLLM its ZeroMQ sockets, a `vllm_dist_*` file and logs; Ray a
session folder with sockets and logs. Nothing of it is removed at exit, so every start used to leave a
few files behind. Each run now gives such a process a folder of its own (`$TMPDIR/ahl-KIND-XXXXXXXX`,
short: Unix socket paths must stay under 108 bytes) as its TMPDIR and removes it at stop. A run killed
outright cannot remove its folder; the next run on the host removes every folder whose owner process
(pid and start time, recorded inside) is gone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import psutil

OWNER_FILE = ".owner"
PREFIX = "ahl-"
# vLLM puts ZeroMQ sockets straight into the folder (`<folder>/<uuid4>`), and a Unix socket path holds at
# most 107 bytes: `<root>/ahl-vllm-XXXXXXXX/` + 36 leaves 52 for the root. A longer $TMPDIR (a test's
# tmp_path, a deep home) falls back to the system's short one.
MAX_ROOT_CHARS = 48
SHORT_ROOT = Path("/tmp")


def _root(root: str | Path | None) -> Path:
    """Where the folders go: `root` (default $TMPDIR), or /tmp when that is too long for socket paths."""
    base = Path(root or tempfile.gettempdir())
    if len(str(base)) > MAX_ROOT_CHARS and SHORT_ROOT.is_dir():
        return SHORT_ROOT
    return base


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _owner_alive(folder: Path) -> bool:
    """Whether the process that made `folder` still runs (an unreadable record counts as alive:
    a folder being made right now has none yet)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, started = int(owner["pid"]), float(owner["started"])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return True
    now = _start_time(pid)
    return now is not None and abs(now - started) < 1.0  # the same process, not a reused pid


def prune(kind: str, root: str | Path | None = None) -> list[Path]:
    """Remove the `kind` folders in `root` (default $TMPDIR) whose owner process is gone; returns them."""
    removed = []
    for folder in _root(root).glob(f"{PREFIX}{kind}-*"):
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def make(kind: str, pid: int, root: str | Path | None = None) -> Path:
    """A new private folder for a `kind` process owned by process `pid` (stale ones pruned first)."""
    prune(kind, root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=_root(root)))  # mode 0700
    started = _start_time(pid)
    (folder / OWNER_FILE).write_text(json.dumps({"pid": pid, "started": started or 0.0}))
    return folder


def remove(folder: Path | None) -> None:
    """Remove a folder made by `make` (and whatever its process left in it)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
