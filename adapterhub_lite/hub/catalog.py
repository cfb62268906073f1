"""The hub's search index: a snapshot of the newest non-yanked version of each adapter, searched without
a query to the registry and without Python work per adapter.

The registry's own search runs SQL over every version (LIKE on names, descriptions and tags) and picks
the newest of each adapter in Python; at 10,000 versions that costs more than a web page may take (see
benchmarks/hub_bench.py). Here every adapter's search text (`namespace/name`, description, tags; lower
case) is laid end to end in one string, so a query is `str.find` in C plus a bisect per hit; tags map to
adapters in a dict; each entry's JSON is encoded once per snapshot. Anonymous callers search a second
snapshot of public adapters only, so their answers need no filtering at all.

The snapshot is rebuilt synchronously after the hub's own changes and when the registry's change probe
moves (another process published, yanked or shared; SQLite's data_version, PostgreSQL's
notifications): a query after a change made behind the hub's back waits for the rebuild, so an
adapter made private there is never shown from an older snapshot. Without a probe it is rebuilt in the
background when older than `max_age_s`. The match rules are the registry's: text in `namespace/name`,
description or tags (case-insensitive), newest non-yanked version of each adapter (pre-releases only
where nothing else is left).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapterhub_lite.bundles.naming import semver_key

_SEP = "\x00"  # between adapters' texts: no query holds it (the API refuses control characters)


def _newest(rows: list[Any]) -> Any:
    releases = [p for p in rows if "-" not in p.version]
    return max(releases or rows, key=lambda p: semver_key(p.version))


@dataclass
class _Snapshot:
    rows: list[Any] = field(default_factory=list)
    blob: str = ""
    starts: list[int] = field(default_factory=list)
    by_tag: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: list[Any]) -> _Snapshot:
        snap = cls(rows=rows)
        parts, pos = [], 0
        for i, p in enumerate(rows):
            text = "\n".join([f"{p.namespace}/{p.name}", p.description, *p.tags]).lower().replace(_SEP, " ")
            snap.starts.append(pos)
            parts.append(text)
            pos += len(text) + 1
            for t in p.tags:
                snap.by_tag.setdefault(t, []).append(i)
        snap.blob = _SEP.join(parts)
        return snap

    def matching(self, needle: str) -> list[int]:
        """Indexes of the rows whose text contains `needle` (in order)."""
        if not needle:
            return list(range(len(self.rows)))
        out: list[int] = []
        blob, starts, find = self.blob, self.starts, self.blob.find
        at = find(needle)
        while at >= 0:
            i = bisect.bisect_right(starts, at) - 1
            out.append(i)
            nxt = starts[i + 1] if i + 1 < len(starts) else len(blob)
            at = find(needle, nxt)
        return out


class Catalog:
    """Newest non-yanked version of each adapter, searchable; `public` for anonymous callers."""

    def __init__(
        self,
        load: Callable[[], list[Any]],
        max_age_s: float = 5.0,
        changed: Callable[[], int] | None = None,
    ) -> None:
        self._load = load
        self._changed = changed
        self.max_age_s = max_age_s
        self._all = self._public = _Snapshot()
        self._json: dict[str, bytes] = {}
        self._at = 0.0
        self._seen: int | None = None
        self._lock = threading.Lock()
        self._refreshing = False

    def refresh(self) -> None:
        """Rebuild now (blocking)."""
        with self._lock:
            seen = self._probe()
            rows = self._load()
            by_package: dict[tuple[str, str], list[Any]] = {}
            for p in rows:
                if not p.yanked:
                    by_package.setdefault((p.namespace, p.name), []).append(p)
            newest = [_newest(by_package[key]) for key in sorted(by_package)]
            encoded = {p.ref: json.dumps(p.to_dict()).encode() for p in newest}
            everything, public = _Snapshot.of(newest), _Snapshot.of([p for p in newest if p.public])
            self._all, self._public, self._json = everything, public, encoded
            self._at, self._seen = time.monotonic(), seen

    def _probe(self) -> int | None:
        return self._changed() if self._changed is not None else None

    def _stale(self) -> bool:
        if self._changed is not None:
            return self._probe() != self._seen
        return time.monotonic() - self._at > self.max_age_s

    def _background_refresh(self) -> None:
        try:
            self.refresh()
        finally:
            self._refreshing = False

    def _current(self) -> None:
        if not self._at:
            self.refresh()
        elif self._changed is not None:
            # Another process changed the registry (a publish, a yank, an adapter made private): the
            # answer waits for the rebuild, or it could show what may no longer be shown.
            if self._probe() != self._seen:
                with self._lock:
                    current = self._probe() == self._seen  # another thread rebuilt it meanwhile
                if not current:
                    self.refresh()
        elif not self._refreshing and self._stale():
            self._refreshing = True
            threading.Thread(target=self._background_refresh, daemon=True).start()

    def as_json(self, p: Any) -> bytes:
        """`p.to_dict()` as JSON, encoded once per snapshot."""
        data = self._json.get(p.ref)
        return data if data is not None else json.dumps(p.to_dict()).encode()

    def search(
        self, text: str = "", base: str | None = None, tag: str | None = None, public_only: bool = False
    ) -> list[Any]:
        """Entries whose text contains `text` (case-insensitive), for `base` and with `tag` if given."""
        self._current()
        snap = self._public if public_only else self._all
        needle = text.lower()
        if "\n" in needle or _SEP in needle:
            return []  # fields are joined by newlines; no name, description or tag holds one
        if tag is not None:
            tagged = snap.by_tag.get(tag, [])
            hits = tagged if not needle else sorted(set(tagged) & set(snap.matching(needle)))
        else:
            hits = snap.matching(needle)
        rows = snap.rows
        if base is not None:
            return [rows[i] for i in hits if rows[i].base_fingerprint == base]
        return [rows[i] for i in hits]
