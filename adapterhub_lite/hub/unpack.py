"""A bundle archive unpacked while it is uploaded: the strict reader of `bundles.archive`, on a stream.

The same rules as `scan_archive` (flat regular files only, every header the one `pack` writes, sorted,
no duplicates, zero padding, a complete trailer and nothing after it), checked as the bytes arrive;
each member goes straight to its file through `FileIntake`, which hashes it and value-scans the weights
on the way, so the registry's verification reads nothing twice. The files are fsynced (the blob store
takes them by hard link). A broken archive raises `BundleError`; the caller removes the folder.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from adapterhub_lite.bundles.archive import BLOCK, MAX_ENTRIES, canonical_header, padding
from adapterhub_lite.bundles.archive import _check_name as check_entry_name
from adapterhub_lite.bundles.compat import WEIGHTS_FILE
from adapterhub_lite.bundles.values import ValueReport
from adapterhub_lite.bundles.verify import Precomputed
from adapterhub_lite.errors import BundleError
from adapterhub_lite.registry.intake import FileIntake, precomputed

_LABEL = "upload"
_REPACK = "make the archive again with `adapterhub pack --archive`, then publish it"


class StreamUnpacker:
    """Feed it the archive's bytes in order (`feed`), then `finish`; files land in `dest`."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        self.dest.mkdir(mode=0o700)
        self.names: list[str] = []
        self.hashes: dict[str, str] = {}
        self.weights_values: ValueReport | BundleError | None = None
        self._buf = bytearray()  # header, padding or trailer bytes not yet complete
        self._state = "header"
        self._left = 0  # bytes of the current member's data (or padding) still to come
        self._intake: FileIntake | None = None
        self._pos = 0

    def _fail(self, what: str) -> BundleError:
        return BundleError(f"{_LABEL}: {what}", hint=_REPACK)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._state == "data":
                take = min(self._left, len(view))
                assert self._intake is not None
                self._intake.write(view[:take])
                view, self._left = view[take:], self._left - take
                self._pos += take
                if not self._left:
                    self._end_member()
                continue
            if self._state == "done":
                raise self._fail("data after the end-of-archive marker")
            need = (BLOCK if self._state in ("header", "trailer") else self._left) - len(self._buf)
            take = min(need, len(view))
            self._buf += view[:take]
            view = view[take:]
            self._pos += take
            if take == need:
                block, self._buf = bytes(self._buf), bytearray()
                self._block(block)

    def _block(self, block: bytes) -> None:
        if self._state == "padding":
            if block.strip(b"\0"):
                raise self._fail(f"non-zero padding after entry {self.names[-1]!r}")
            self._state = "header"
        elif self._state == "trailer":
            if block != b"\0" * BLOCK:
                raise self._fail("data after the end-of-archive marker")
            self._state = "done"
        elif block == b"\0" * BLOCK:
            self._state = "trailer"
        else:
            self._header(block)

    def _header(self, block: bytes) -> None:
        at = self._pos - BLOCK
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except (tarfile.TarError, ValueError) as exc:
            raise self._fail(f"corrupt header at byte {at} ({exc})") from None
        check_entry_name(info, _LABEL)
        try:
            canonical = canonical_header(info.name, info.size)
        except ValueError as exc:  # a size no tar header of `adapterhub pack` can hold
            raise self._fail(f"corrupt header at byte {at} ({exc})") from None
        if block != canonical:
            raise self._fail(
                f"header of entry {info.name!r} is not the one `adapterhub pack` writes "
                "(time, owner or mode changed, or corrupt)"
            )
        if info.name in self.names:
            raise self._fail(f"entry {info.name!r} appears twice")
        if self.names and info.name < self.names[-1]:
            raise self._fail(f"entries are not sorted ({info.name!r})")
        if len(self.names) >= MAX_ENTRIES:
            raise self._fail(f"more than {MAX_ENTRIES} entries")
        self.names.append(info.name)
        self._intake = FileIntake(
            self.dest / info.name,
            info.size,
            f"{_LABEL}:{info.name}",
            scan_values=info.name == WEIGHTS_FILE,
            durable=True,
        )
        self._left = info.size
        self._state = "data"
        if not info.size:
            self._end_member()

    def _end_member(self) -> None:
        assert self._intake is not None
        intake, self._intake = self._intake, None
        sha, values = intake.finish()
        name = self.names[-1]
        self.hashes[name] = sha
        if name == WEIGHTS_FILE:
            self.weights_values = values
        self._left = padding(intake.size)
        self._state = "padding" if self._left else "header"

    def finish(self) -> Precomputed:
        """Check the archive ended where it should; what verification may take as established."""
        if self._state != "done":
            where = "inside an entry" if self._state in ("data", "padding") else "before its end marker"
            raise self._fail(f"truncated archive (ends {where}, at byte {self._pos})")
        return precomputed(self.hashes, self.weights_values)

    def abort(self) -> None:
        """Stop the file being written (the caller removes `dest`)."""
        if self._intake is not None:
            self._intake.abort()
            self._intake = None
