"""Content-addressed blob storage through fsspec: a local folder by default, any fsspec URL otherwise.

A blob lives at `sha256/<2 hex>/<64 hex>` and is only ever written as a whole: bytes go to `tmp/<uuid>`
while being hashed, and are renamed into place only when the hash is the expected one. A reader can
therefore never see a partial blob, and a process killed mid-write leaves only a temp file, which
`Registry.check(repair=True)` removes. In a local folder the blob and its folder are fsynced before the
index commits the version (SQLite `synchronous = FULL`), so a power cut cannot leave the index naming
a blob that is not on disk; object stores make a completed upload durable themselves.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.registry.faults import fault_point

_CHUNK = 1 << 22
Progress = Callable[[int], object] | None


@dataclass(frozen=True)
class StoredFile:
    path: str
    sha256: str | None  # None for temp files
    size: int
    age_s: float


class BlobStore:
    """Blobs addressed by sha256 in an fsspec filesystem."""

    def __init__(self, target: str | fsspec.AbstractFileSystem) -> None:
        if isinstance(target, fsspec.AbstractFileSystem):
            self.fs, self.root, self.url = target, "", f"<{type(target).__name__}>"
        else:
            try:
                self.fs, self.root = fsspec.url_to_fs(target)
            except (ValueError, ImportError) as exc:
                raise RegistryError(
                    f"cannot open blob storage {target!r}: {exc}",
                    hint="use a local folder or an fsspec URL whose package is installed",
                    kind=ErrorKind.INVALID,
                ) from None
            self.url = target
        self.root = self.root.rstrip("/")

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    def path(self, sha: str) -> str:
        return self._p("sha256", sha[:2], sha)

    def exists(self, sha: str) -> bool:
        return self.fs.exists(self.path(sha))

    def _write(self, sha: str, chunks: Iterator[bytes], progress: Progress) -> bool:
        if self.exists(sha):
            return False
        tmp = self._p("tmp", uuid.uuid4().hex)
        self.fs.makedirs(self._p("tmp"), exist_ok=True)
        h = hashlib.sha256()
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
            fault_point("blob-temp-written")
            if h.hexdigest() != sha:
                raise RegistryError(
                    f"content changed while being stored (expected sha256 {sha}, got {h.hexdigest()})",
                    hint="do not modify a bundle while it is being published; publish it again",
                    kind=ErrorKind.CONFLICT,
                )
            self._sync_local(tmp)
            self.fs.makedirs(self._p("sha256", sha[:2]), exist_ok=True)
            self.fs.mv(tmp, self.path(sha))
            self._sync_local(self._p("sha256", sha[:2]))  # the rename itself
        except BaseException:
            try:
                self.fs.rm(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise
        fault_point("blob-stored")
        return True

    def _sync_local(self, path: str) -> None:
        """fsync a file or folder of a local store (a no-op for other filesystems)."""
        if not isinstance(self.fs, LocalFileSystem):
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_file(self, local: Path, sha: str, progress: Progress = None, link: bool = False) -> bool:
        """Store a local file under its sha256 (verified while copying); False if already stored.

        `link`: the file is a private, fsynced copy whose sha256 the caller established as it was
        written and that nobody modifies any more (the hub's upload folder); a local store then takes
        it by hard link, without copying or reading it (a copy where a link is impossible)."""
        if link and isinstance(self.fs, LocalFileSystem) and self._link(Path(local), sha, progress):
            return True

        def chunks() -> Iterator[bytes]:
            with Path(local).open("rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

        return self._write(sha, chunks(), progress)

    def _link(self, local: Path, sha: str, progress: Progress) -> bool:
        """Hard-link `local` in as blob `sha`; False where the filesystem cannot (copy instead)."""
        final = self.path(sha)
        folder = self._p("sha256", sha[:2])
        os.makedirs(folder, exist_ok=True)
        try:
            os.link(local, final)  # atomic; never replaces a blob already there
        except FileExistsError:
            return True
        except OSError:  # another filesystem, or links not allowed
            return False
        self._sync_local(folder)
        if progress:
            progress(local.stat().st_size)
        fault_point("blob-stored")
        return True

    def put_bytes(self, data: bytes, progress: Progress = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._write(sha, iter([data]), progress)
        return sha

    def open(self, sha: str) -> IO[bytes]:
        try:
            return self.fs.open(self.path(sha), "rb")
        except FileNotFoundError:
            raise RegistryError(
                f"blob sha256:{sha} is missing from {self.url}",
                hint="run `adapterhub registry check`, then publish the bundle again",
                kind=ErrorKind.INTERNAL,
            ) from None

    def get_file(self, sha: str, dest: Path, progress: Progress = None) -> None:
        """Copy a blob to a local file, checking its hash on the way."""
        h = hashlib.sha256()
        with self.open(sha) as f, Path(dest).open("wb") as out:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                if progress:
                    progress(len(chunk))
        if h.hexdigest() != sha:
            raise RegistryError(
                f"blob sha256:{sha} in {self.url} is corrupt (its content has another hash)",
                hint="run `adapterhub registry check --deep`, then publish the bundle again",
                kind=ErrorKind.INTERNAL,
            )

    def hash_blob(self, sha: str) -> str:
        h = hashlib.sha256()
        with self.open(sha) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _listing(self, sub: str) -> list[tuple[str, dict]]:
        base = self._p(sub)
        if not self.fs.exists(base):
            return []
        return sorted(self.fs.find(base, detail=True).items())

    @staticmethod
    def _age(info: dict) -> float:
        # Local and memory filesystems say `mtime`/`created`; S3 (s3fs) says `LastModified`. Without a
        # stamp the file counts as old: `repair` may remove it.
        stamp = next((info[k] for k in ("mtime", "created", "LastModified") if info.get(k) is not None), None)
        if isinstance(stamp, datetime):
            stamp = stamp.timestamp()
        return time.time() - float(stamp) if stamp is not None else float("inf")

    def blobs(self) -> list[StoredFile]:
        out = []
        for path, info in self._listing("sha256"):
            name = path.rsplit("/", 1)[-1]
            sha = name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None
            out.append(StoredFile(path, sha, int(info.get("size") or 0), self._age(info)))
        return out

    def temp_files(self) -> list[StoredFile]:
        return [StoredFile(p, None, int(i.get("size") or 0), self._age(i)) for p, i in self._listing("tmp")]

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass
