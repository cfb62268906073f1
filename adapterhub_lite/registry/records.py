"""What the registry hands out: published versions and check reports, and how refs are read."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from adapterhub_lite.bundles.naming import Ref, parse_ref, semver_key
from adapterhub_lite.errors import ErrorKind, RegistryError


def invalid(message: str, hint: str | None = None) -> RegistryError:
    """A RegistryError for malformed input (a bad name, version or reference)."""
    return RegistryError(message, hint, kind=ErrorKind.INVALID)


def ref_of(ref: str) -> Ref:
    """Parse `namespace/name@version` or `namespace/name`; INVALID RegistryError if malformed."""
    return parse_ref(ref, invalid)  # type: ignore[arg-type]  # an error factory, called like a class


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Published:
    """One published version, as the index records it."""

    namespace: str
    name: str
    version: str
    digest: str
    base_name: str
    base_fingerprint: str
    yanked: bool
    public: bool
    size: int
    rank: int
    license: str
    description: str
    created: str
    published_at: str
    signed: bool
    tags: tuple[str, ...] = ()
    yank_reason: str = ""
    # Base fingerprints the weights were shape-checked against at publish (empty: none was known).
    checked_bases: tuple[str, ...] = ()
    id: int = field(default=0, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["tags"] = list(self.tags)
        d["checked_bases"] = list(self.checked_bases)
        d["ref"] = self.ref
        return d


@dataclass
class CheckReport:
    """What `Registry.check` found (and, with repair, removed)."""

    orphaned_blobs: list[str] = field(default_factory=list)
    missing_blobs: list[dict[str, str]] = field(default_factory=list)
    corrupt_blobs: list[str] = field(default_factory=list)
    stale_temp_files: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    index_ok: bool = True
    unscoped_keys: list[str] = field(default_factory=list)  # trusted for every namespace: a warning

    @property
    def ok(self) -> bool:
        return self.index_ok and not (
            self.orphaned_blobs or self.missing_blobs or self.corrupt_blobs or self.stale_temp_files
        )

    @property
    def repaired(self) -> bool:
        """A repair left nothing that needs a person (no missing, corrupt or spared-as-recent files)."""
        return not (self.missing_blobs or self.corrupt_blobs or self.kept_recent)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def newest(rows: Iterable[Published]) -> Published | None:
    """The highest semver release among `rows`; pre-releases only when there is no release."""
    rows = list(rows)
    releases = [p for p in rows if "-" not in p.version]
    pool = releases or rows
    return max(pool, key=lambda p: semver_key(p.version)) if pool else None
