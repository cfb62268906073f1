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
from collections.abc import Callable, Iterable, Iterator
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


def padding(size: int) -> int:
    """Zero bytes after a member of `size` bytes, up to the next tar block."""
    return (BLOCK - size % BLOCK) % BLOCK


class ArchiveWriter:
    """Writes a reproducible bundle archive entry by entry, atomically (temp file, then rename).

    Entries must be added in sorted order; each one's size is given up front (it goes in the header
    before the data), and data that does not match it is refused.
    """

    def __init__(self, out_path: Path) -> None:
        self.out_path = Path(out_path)
        fd, self.tmp = tempfile.mkstemp(
            dir=self.out_path.parent, prefix=f".{self.out_path.name}.", suffix=".tmp"
        )
        self.out = os.fdopen(fd, "wb")
        self.last: str | None = None

    def add(self, name: str, size: int, chunks: Iterable[bytes]) -> None:
        if self.last is not None and name <= self.last:
            raise ValueError(f"archive entries must be added in sorted order ({name!r} after {self.last!r})")
        self.last = name
        self.out.write(canonical_header(name, size))
        written = 0
        for chunk in chunks:
            self.out.write(chunk)
            written += len(chunk)
        if written != size:
            raise BundleError(
                f"{name}: changed size while being archived ({size} -> {written} bytes)",
                hint="do not modify the adapter while it is being packed; pack it again",
            )
        self.out.write(b"\0" * padding(size))

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                # No fsync: temp-then-rename already makes a crashed pack leave nothing behind, and
                # the directory form is not fsynced either; power-loss durability is the filesystem's.
                self.out.write(b"\0" * (2 * BLOCK))
            self.out.close()
            if exc_type is None:
                os.chmod(self.tmp, 0o644)
                os.replace(self.tmp, self.out_path)
        finally:
            if Path(self.tmp).exists():
                Path(self.tmp).unlink()


def file_chunks(path: Path, progress: Callable[[int], object] | None = None) -> Iterator[bytes]:
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            if progress:
                progress(len(chunk))
            yield chunk


def write_archive(
    src_dir: Path, names: list[str], out_path: Path, progress: Callable[[int], object] | None = None
) -> Path:
    """Write `names` from `src_dir` as a reproducible tar at `out_path` (atomically)."""
    with ArchiveWriter(out_path) as w:
        for name in sorted(names):
            path = Path(src_dir) / name
            w.add(name, path.stat().st_size, file_chunks(path, progress))
    return Path(out_path)


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
            end = data_at + info.size + padding(info.size)
            if end > total:
                raise BundleError(
                    f"{label}: truncated archive (entry {info.name!r} needs {info.size} bytes)", hint=_REPACK
                )
            f.seek(data_at + info.size)
            if f.read(padding(info.size)).strip(b"\0"):
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
