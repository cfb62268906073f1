"""The single-file bundle: a byte-for-byte reproducible, strictly read tar archive.

Writing: plain ustar, entries sorted by name, mtime 0, uid/gid 0, no owner names, mode 0644, no
compression (safetensors weights hardly compress) and no record padding, so the same files always give
the same bytes and the same digest.

Reading: the whole archive is checked before anything is written anywhere. Only flat regular files are
allowed (no `..`, absolute paths, directories, symlinks, hardlinks or devices), every header must be the
one this writer would produce, padding and trailer must be zeros, and nothing may follow the trailer.
Together with the manifest's hashes of the file contents, that makes every byte of the archive checked.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.errors import BundleError

BLOCK = 512
MAX_ENTRIES = 32
_CHUNK = 1 << 22
_REPACK = "get the archive again, or re-create it with `adapterhub pack --archive`"


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    offset: int  # of the data, from the start of the archive


def canonical_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK


def write_archive(
    src_dir: Path, names: list[str], out_path: Path, progress: Callable[[int], object] | None = None
) -> Path:
    """Write `names` from `src_dir` as a reproducible tar at `out_path` (atomically: temp file, rename)."""
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for name in sorted(names):
                path = src_dir / name
                size = path.stat().st_size
                out.write(canonical_header(name, size))
                with path.open("rb") as f:
                    copied = 0
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        copied += len(chunk)
                        if progress:
                            progress(len(chunk))
                if copied != size:
                    raise BundleError(f"{path}: changed size while being archived", hint="pack it again")
                out.write(b"\0" * _padding(size))
            out.write(b"\0" * (2 * BLOCK))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _check_name(info: tarfile.TarInfo, label: str) -> None:
    name = info.name
    kind = None
    if info.issym():
        kind = f"a symlink (to {info.linkname!r})"
    elif info.islnk():
        kind = f"a hardlink (to {info.linkname!r})"
    elif info.ischr() or info.isblk() or info.isfifo():
        kind = "a device or fifo"
    elif info.isdir():
        kind = "a directory"
    elif not info.isreg():
        kind = f"an unsupported entry type {info.type!r}"
    if kind:
        raise BundleError(
            f"{label}: entry {name!r} is {kind}; refused, nothing was extracted",
            hint="a bundle archive holds plain files only; " + _REPACK,
        )
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(
            f"{label}: entry {name!r} is an absolute path; refused, nothing was extracted", hint=_REPACK
        )
    if ".." in name.replace("\\", "/").split("/"):
        raise BundleError(
            f"{label}: entry {name!r} escapes the bundle directory ('..'); refused, nothing was extracted",
            hint=_REPACK,
        )
    if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise BundleError(
            f"{label}: entry {name!r} is not a plain file name; refused, nothing was extracted", hint=_REPACK
        )


def scan_archive(path: Path) -> list[Entry]:
    """Check every header, padding and the trailer of a bundle archive; return its entries.

    Reads headers and padding only (not the file data), and writes nothing.
    """
    path = Path(path)
    label = str(path)
    total = path.stat().st_size
    entries: list[Entry] = []
    with path.open("rb") as f:
        pos = 0
        while True:
            buf = f.read(BLOCK)
            if len(buf) < BLOCK:
                raise BundleError(
                    f"{label}: truncated archive (ends inside a header at byte {pos})", hint=_REPACK
                )
            if buf == b"\0" * BLOCK:
                rest = f.read(BLOCK + 1)
                if rest != b"\0" * BLOCK:
                    what = (
                        "truncated archive (incomplete end marker)"
                        if len(rest) < BLOCK
                        else ("data after the end-of-archive marker")
                    )
                    raise BundleError(f"{label}: {what}", hint=_REPACK)
                break
            try:
                info = tarfile.TarInfo.frombuf(buf, "utf-8", "strict")
            except (tarfile.TarError, ValueError) as exc:
                raise BundleError(f"{label}: corrupt header at byte {pos} ({exc})", hint=_REPACK) from None
            _check_name(info, label)
            if buf != canonical_header(info.name, info.size):
                raise BundleError(
                    f"{label}: header of entry {info.name!r} is not the one `adapterhub pack` writes "
                    "(time, owner or mode changed, or corrupt)",
                    hint=_REPACK,
                )
            if any(e.name == info.name for e in entries):
                raise BundleError(f"{label}: entry {info.name!r} appears twice", hint=_REPACK)
            if entries and info.name < entries[-1].name:
                raise BundleError(f"{label}: entries are not sorted ({info.name!r})", hint=_REPACK)
            if len(entries) >= MAX_ENTRIES:
                raise BundleError(f"{label}: more than {MAX_ENTRIES} entries", hint=_REPACK)
            data_at = pos + BLOCK
            end = data_at + info.size + _padding(info.size)
            if end > total:
                raise BundleError(
                    f"{label}: truncated archive (entry {info.name!r} needs {info.size} bytes)", hint=_REPACK
                )
            f.seek(data_at + info.size)
            if f.read(_padding(info.size)).strip(b"\0"):
                raise BundleError(f"{label}: non-zero padding after entry {info.name!r}", hint=_REPACK)
            entries.append(Entry(info.name, info.size, data_at))
            pos = end
    return entries


def iter_entry(path: Path, entry: Entry, chunk: int = _CHUNK, limit: int | None = None):
    """Yield the data of one entry (or its first `limit` bytes) in chunks."""
    with Path(path).open("rb") as f:
        f.seek(entry.offset)
        remaining = entry.size if limit is None else min(limit, entry.size)
        while remaining:
            data = f.read(min(chunk, remaining))
            if not data:
                raise BundleError(f"{path}: truncated archive (entry {entry.name!r})", hint=_REPACK)
            remaining -= len(data)
            yield data


def extract_archive(path: Path, dest: Path, progress: Callable[[int], object] | None = None) -> Path:
    """Safely extract a bundle archive into the new directory `dest` (all checks first; temp dir, rename)."""
    dest = Path(dest)
    entries = scan_archive(path)
    if dest.exists():
        raise BundleError(f"{dest} already exists", hint="choose another destination or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for e in entries:
            with (tmp / e.name).open("wb") as out:
                for data in iter_entry(path, e):
                    out.write(data)
                    if progress:
                        progress(len(data))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
