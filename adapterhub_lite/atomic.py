"""Writing files so that a crash leaves either the old content or the new, never half of one.

Every file the project writes that another step trusts (records, manifests, indexes, checkpoints)
goes through here: write a temporary sibling, optionally fsync it, then rename over the target
(`os.replace` is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary sibling of `path` for binary writing; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is untouched. `durable=True` fsyncs
    the file and its folder, for files that must survive a power loss, not only a crash.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_open(path, durable=durable) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike[str], data: Any, *, durable: bool = False, **dumps: Any) -> None:
    """Replace `path` with `data` as JSON atomically (`dumps` kwargs default to indent=2)."""
    dumps.setdefault("indent", 2)
    write_text(path, json.dumps(data, **dumps) + "\n", durable=durable)
