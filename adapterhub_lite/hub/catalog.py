"""The hub's search: an in-memory snapshot of the registry's versions, so a query is a scan of a list.

The registry's own search runs SQL over every version (LIKE on names, descriptions and tags); at 10,000
versions that costs far more than a web page may take (see benchmarks/hub_bench.py). The snapshot is
refreshed synchronously after the hub's own changes and in the background when older than `max_age_s`
(changes made to the registry behind the hub's back, say a local `adapterhub share --private`, show in
search results within that; adapter pages and every API call ask the registry itself), so no query
waits on it.
The match rules are the registry's: text in `namespace/name`, description or tags (case-insensitive),
newest non-yanked version of each adapter (pre-releases only where nothing else is left).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from adapterhub_lite.bundles.naming import semver_key


def _newest(rows: list[Any]) -> Any:
    releases = [p for p in rows if "-" not in p.version]
    return max(releases or rows, key=lambda p: semver_key(p.version))


class Catalog:
    """Newest non-yanked version of each adapter, with its lower-cased search text."""

    def __init__(self, load: Callable[[], list[Any]], max_age_s: float = 5.0) -> None:
        self._load = load
        self.max_age_s = max_age_s
        self._entries: list[tuple[str, Any]] = []
        self._dicts: dict[str, dict[str, Any]] = {}
        self._at = 0.0
        self._lock = threading.Lock()
        self._refreshing = False

    def refresh(self) -> None:
        """Reload now (blocking)."""
        with self._lock:
            rows = self._load()
            by_package: dict[tuple[str, str], list[Any]] = {}
            for p in rows:
                if not p.yanked:
                    by_package.setdefault((p.namespace, p.name), []).append(p)
            entries = []
            for key in sorted(by_package):
                p = _newest(by_package[key])
                text = "\n".join([f"{p.namespace}/{p.name}", p.description, *p.tags]).lower()
                entries.append((text, p))
            self._dicts = {p.ref: p.to_dict() for _, p in entries}
            self._entries, self._at = entries, time.monotonic()

    def _background_refresh(self) -> None:
        try:
            self.refresh()
        finally:
            self._refreshing = False

    def as_dict(self, p: Any) -> dict[str, Any]:
        """`p.to_dict()`, computed once per snapshot (a search answer may list hundreds)."""
        d = self._dicts.get(p.ref)
        return d if d is not None and d["digest"] == p.digest else p.to_dict()

    def search(self, text: str = "", base: str | None = None, tag: str | None = None) -> list[Any]:
        if not self._at:
            self.refresh()
        elif time.monotonic() - self._at > self.max_age_s and not self._refreshing:
            self._refreshing = True
            threading.Thread(target=self._background_refresh, daemon=True).start()
        needle = text.lower()
        if "\n" in needle:
            return []  # the fields are joined by newlines; no name, description or tag holds one
        return [
            p
            for t, p in self._entries
            if needle in t
            and (base is None or p.base_fingerprint == base)
            and (tag is None or tag in p.tags)
        ]
