"""The hub's serving copies: verified bundle directories keyed by digest, so pulls are plain file reads.

A publish leaves its verified upload here (no extra copy); a version published some other way is pulled
from the registry on first request. The folder is bounded: the least recently used bundles go first.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_MAX_BYTES = 20 * 1024**3
_KEEP_RECENT_S = 300.0  # a bundle served in the last minutes may still be streaming: never evicted


class BundleCache:
    """Bundle directories under `root`, at most `max_bytes` in all (beyond the ones in use)."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        for stale in self.root.glob(".*"):  # interrupted pulls of an earlier run
            shutil.rmtree(stale, ignore_errors=True)

    def _dir(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def get(self, registry: Any, ref: str, digest: str) -> Path:
        """The verified bundle directory of `ref` (pulled from the registry if not here)."""
        d = self._dir(digest)
        if not d.is_dir():
            registry.pull(ref, d, vllm_check=False)
            self._evict()
        os.utime(d)
        return d

    def adopt(self, bundle_dir: Path, digest: str) -> None:
        """Keep a just-published (verified) bundle directory as the serving copy of `digest`."""
        d = self._dir(digest)
        try:
            os.rename(bundle_dir, d)
        except OSError:
            shutil.rmtree(bundle_dir, ignore_errors=True)  # already here (same digest, same bytes)
            return
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            entries = []
            for d in self.root.iterdir():
                if d.name.startswith(".") or not d.is_dir():
                    continue
                size = sum(f.stat().st_size for f in d.iterdir())
                entries.append((d.stat().st_mtime, size, d))
            total = sum(e[1] for e in entries)
            now = time.time()
            for mtime, size, d in sorted(entries):
                if total <= self.max_bytes:
                    break
                if now - mtime < _KEEP_RECENT_S:
                    continue
                shutil.rmtree(d, ignore_errors=True)
                total -= size
