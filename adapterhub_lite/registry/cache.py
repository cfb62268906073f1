"""A bounded LRU cache of bundles on local disk: the one used by the serving resolver (the folders it
hands to vLLM) and by the hub (the copies it serves pulls from).

Entries are keyed by content digest, so two references to the same bytes share one copy. An entry is
written to a temporary folder inside the cache (`.incoming-*`) and renamed into place, so a crash never
leaves a half-written bundle that a later run would load; leftovers of a crashed run are removed when
the cache is first used. The bound counts downloads in progress: a download first reserves its size
(evicting least recently used entries to make room), and a bundle larger than the whole bound is
refused. Eviction skips entries the caller pins (those vLLM has loaded: its worker may re-read them from
disk after its own in-memory LRU drops them) and entries under a lease.

A lease keeps one entry from eviction from the moment its path is handed out until the holder releases
it (vLLM's worker has read the folder) or its time runs out (a holder that never reports back cannot pin
an entry for good). It is taken under the same lock as eviction, so an entry is never handed out and
deleted at once. Leases are bounded in number; pinned and leased entries count against the bound, and a
download that finds no room because of them is refused with a retryable "unavailable".
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.errors import ErrorKind, RegistryError

INCOMING_PREFIX = ".incoming-"
# Longest a lease pins an entry: far above the time vLLM's engine takes to read a folder it was handed
# (it reads between engine steps), short enough that a lost release costs room only briefly.
LEASE_SECONDS = 120.0
MAX_LEASES = 1024  # leases held at once; more is refused with "unavailable" (each is an entry pinned)


@dataclass(frozen=True)
class Lease:
    """An entry's folder, kept from eviction until `BundleCache.release(lease)` or its deadline."""

    path: Path
    token: int


def _dir_size(path: Path) -> int:
    """Bytes of the files under `path`; 0 for what vanished meanwhile (a concurrent eviction)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _entry_name(digest: str) -> str:
    return digest.replace(":", "-")


class BundleCache:
    """Bundles on disk under `root`, at most `max_bytes` in all, downloads in progress included."""

    def __init__(
        self,
        root: str | Path,
        max_bytes: int,
        lease_seconds: float = LEASE_SECONDS,
        max_leases: int = MAX_LEASES,
        clock: Callable[[], float] = time.monotonic,
        bound_hint: str = "raise the bundle cache's bound",
    ) -> None:
        self.root = Path(root).expanduser()  # created on first put: vLLM loads the plugin in every process
        self.max_bytes = max_bytes
        self.lease_seconds = lease_seconds
        self.max_leases = max_leases
        self._clock = clock
        self.bound_hint = bound_hint  # how the user raises max_bytes (a flag or setting of theirs)
        self._lock = threading.Lock()  # eviction, renames into place, taking a lease
        # Its own lock, so a release never waits behind an eviction's deletes (the event loop releases).
        self._lease_lock = threading.Lock()
        self._leases: dict[int, tuple[str, float]] = {}  # token -> (entry name, deadline)
        self._tokens = itertools.count(1)
        self._reserved: dict[Path, int] = {}  # download folder -> bytes reserved for it
        self._swept = False
        # Digests that must stay, asked at each eviction (adapters vLLM holds or has requests in flight
        # for): a list taken earlier would be stale by then. Folders being verified or handed to vLLM
        # are leased instead.
        self.pins: Callable[[], Iterable[str]] = lambda: ()

    def path_for(self, digest: str) -> Path:
        return self.root / _entry_name(digest)

    def get(self, digest: str) -> Path | None:
        """The cached entry for `digest`, marked as just used; None if absent."""
        path = self.path_for(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path if path.is_dir() else None

    # -- leases --------------------------------------------------------------------------------------

    def acquire(self, digest: str, seconds: float | None = None) -> Lease | None:
        """The entry for `digest` under a lease (marked as just used); None if absent.

        Raises RegistryError (unavailable) when `max_leases` are held.
        """
        with self._lock:  # no eviction runs between the check and the lease
            path = self.get(digest)
            return None if path is None else Lease(path, self._lease(path.name, seconds))

    def release(self, lease: Lease) -> None:
        """End a lease (idempotent): its entry may be evicted again."""
        with self._lease_lock:
            self._leases.pop(lease.token, None)

    def is_leased(self, lease: Lease) -> bool:
        """Whether the lease still holds (not released, not expired)."""
        with self._lease_lock:
            held = self._leases.get(lease.token)
        return held is not None and held[1] > self._clock()

    def leased(self) -> set[str]:
        """Names of the entries under a live lease (expired ones are dropped)."""
        now = self._clock()
        with self._lease_lock:
            for token in [t for t, (_, deadline) in self._leases.items() if deadline <= now]:
                del self._leases[token]
            return {name for name, _ in self._leases.values()}

    def _lease(self, name: str, seconds: float | None) -> int:
        self.leased()  # drop expired leases before counting
        with self._lease_lock:
            if len(self._leases) >= self.max_leases:
                raise RegistryError(
                    f"the bundle cache has {self.max_leases} bundles being handed out already",
                    hint="retry shortly",
                    kind=ErrorKind.UNAVAILABLE,
                    retry_after=5,
                )
            token = next(self._tokens)
            self._leases[token] = (name, self._clock() + (self.lease_seconds if seconds is None else seconds))
            return token

    # -- entries -------------------------------------------------------------------------------------

    def put(
        self,
        digest: str,
        fill: Callable[[Path], Path],
        pinned: Iterable[str] = (),
        size: int = 0,
        label: str = "",
    ) -> Path:
        """Create the entry for `digest`: `fill(tmp_dir)` writes the bundle and returns its folder.

        `size` (the bundle's bytes, if known) is reserved before the download starts. Raises
        RegistryError (unavailable) when the bundle is larger than the bound, or when pinned entries and
        other downloads leave no room for it now. If `fill` raises, nothing is left behind.
        """
        return self._put(digest, fill, pinned, size, label, lease=False, seconds=None).path

    def put_leased(
        self,
        digest: str,
        fill: Callable[[Path], Path],
        pinned: Iterable[str] = (),
        size: int = 0,
        label: str = "",
        seconds: float | None = None,
    ) -> Lease:
        """As `put`, and the new entry is leased from the moment it is in place (see `acquire`)."""
        return self._put(digest, fill, pinned, size, label, lease=True, seconds=seconds)

    def _put(
        self,
        digest: str,
        fill: Callable[[Path], Path],
        pinned: Iterable[str],
        size: int,
        label: str,
        lease: bool,
        seconds: float | None,
    ) -> Lease:
        name = label or digest
        if size > self.max_bytes:
            raise RegistryError(
                f"{name} is {size / 1e6:.1f} MB, more than the whole bundle cache "
                f"({self.max_bytes / 1e6:.1f} MB)",
                hint=self.bound_hint,
                kind=ErrorKind.UNAVAILABLE,
            )
        final = self.path_for(digest)
        keep = {_entry_name(d) for d in pinned}
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_leftovers()
        tmp = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=self.root))
        try:
            with self._lock:
                self._reserved[tmp] = size
                if self._evict_locked(keep) > self.max_bytes:
                    raise RegistryError(
                        f"no room in the bundle cache for {name} ({size / 1e6:.1f} MB) right now: "
                        "the adapters in use and downloads in progress fill it",
                        hint=f"retry shortly, or {self.bound_hint}",
                        kind=ErrorKind.UNAVAILABLE,
                        retry_after=5,
                    )
            produced = fill(tmp)
            with self._lock:
                if not final.is_dir():  # else another thread got there first; same digest, same bytes
                    os.replace(produced, final)
                os.utime(final)
                token = self._lease(final.name, seconds) if lease else 0
        finally:
            with self._lock:
                self._reserved.pop(tmp, None)
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(pinned=keep | {final.name})
        return Lease(final, token)

    def fetch(
        self,
        digest: str,
        fill: Callable[[Path], Path],
        size: int = 0,
        label: str = "",
        seconds: float | None = None,
    ) -> Lease:
        """The entry for `digest` under a lease: the cached one, else made by `fill` (see `put`)."""
        lease = self.acquire(digest, seconds)
        if lease is None:
            lease = self.put_leased(digest, fill, size=size, label=label, seconds=seconds)
        return lease

    def entries(self) -> list[Path]:
        """Cached entries, least recently used first (entries removed meanwhile are left out)."""
        if not self.root.is_dir():
            return []
        dated = []
        for path in self.root.iterdir():
            if path.name.startswith("."):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # evicted by another thread between listing and stat
                continue
            if path.is_dir():
                dated.append((st.st_mtime, path))
        return [p for _, p in sorted(dated)]

    def total_bytes(self) -> int:
        """Bytes on disk now: entries and downloads in progress."""
        if not self.root.is_dir():
            return 0
        return _dir_size(self.root)

    def evict(self, pinned: set[str] = frozenset()) -> list[Path]:
        """Remove least recently used entries (not pinned) until the cache fits; returns what went."""
        with self._lock:
            before = set(self.entries())
            self._evict_locked(pinned)
            return sorted(before - set(self.entries()))

    def _evict_locked(self, pinned: set[str]) -> int:
        """Evict until entries + reservations fit; returns the total that remains (may exceed the bound
        when only pinned entries are left)."""
        # Leases first, then the caller's pins: a lease released meanwhile was released after its
        # adapter became one vLLM holds, which the pins then include.
        pinned = set(pinned) | self.leased()
        pinned |= {_entry_name(d) for d in self.pins()}
        entries = self.entries()
        sizes = {p: _dir_size(p) for p in entries}
        total = sum(sizes.values()) + sum(self._reserved.values())
        for path in entries:
            if total <= self.max_bytes:
                break
            if path.name in pinned:
                continue
            shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
        return total

    def _sweep_leftovers(self) -> None:
        """Remove download folders left by a crashed process (once per cache object)."""
        if self._swept:
            return
        self._swept = True
        for path in self.root.glob(INCOMING_PREFIX + "*"):
            with self._lock:
                if path in self._reserved:
                    continue
            try:
                if time.time() - path.stat().st_mtime > 3600:  # another live process may own a fresh one
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                continue

    def remove(self, digest: str, own: Lease | None = None) -> bool:
        """Delete the entry for `digest` (a bundle that failed verification) unless someone other than
        `own` holds a lease on it; returns whether it went."""
        path = self.path_for(digest)
        with self._lock:
            if own is not None:
                self.release(own)
            if path.name in self.leased():
                return False
            shutil.rmtree(path, ignore_errors=True)
            return True
