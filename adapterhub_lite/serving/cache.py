"""A bounded LRU cache of verified bundles on local disk.

Entries are keyed by content digest, so two references to the same bytes share one copy. An entry is
written to a temporary folder and renamed into place, so a crash never leaves a half-written bundle
that a later run would load. Eviction skips entries the caller pins (those vLLM has loaded: its worker
may re-read them from disk after its own in-memory LRU drops them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _entry_name(digest: str) -> str:
    return digest.replace(":", "-")


class BundleCache:
    """Bundles on disk under `root`, at most `max_bytes` in all (the newest entry always stays)."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root).expanduser()  # created on first put: vLLM loads the plugin in every process
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def path_for(self, digest: str) -> Path:
        return self.root / _entry_name(digest)

    def get(self, digest: str) -> Path | None:
        """The cached entry for `digest`, marked as just used; None if absent."""
        path = self.path_for(digest)
        if not path.is_dir():
            return None
        os.utime(path)
        return path

    def put(self, digest: str, fill: Callable[[Path], Path], pinned: Iterable[str] = ()) -> Path:
        """Create the entry for `digest`: `fill(tmp_dir)` writes the bundle and returns its folder.

        If `fill` raises, nothing is left behind.
        """
        final = self.path_for(digest)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            produced = fill(tmp)
            with self._lock:
                if final.is_dir():  # another thread got there first; same digest, same bytes
                    return final
                os.replace(produced, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        os.utime(final)
        self.evict(pinned={_entry_name(d) for d in pinned} | {final.name})
        return final

    def entries(self) -> list[Path]:
        """Cached entries, least recently used first."""
        if not self.root.is_dir():
            return []
        items = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted(items, key=lambda p: p.stat().st_mtime)

    def evict(self, pinned: set[str] = frozenset()) -> list[Path]:
        """Remove least recently used entries (not pinned) until the cache fits; returns what went."""
        removed = []
        with self._lock:
            entries = self.entries()
            sizes = {p: _dir_size(p) for p in entries}
            total = sum(sizes.values())
            for path in entries:
                if total <= self.max_bytes:
                    break
                if path.name in pinned:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                total -= sizes[path]
                removed.append(path)
        return removed

    def remove(self, digest: str) -> None:
        shutil.rmtree(self.path_for(digest), ignore_errors=True)

    def touch_all(self, digests: Iterable[str]) -> None:
        now = time.time()
        for d in digests:
            p = self.path_for(d)
            if p.is_dir():
                os.utime(p, (now, now))
