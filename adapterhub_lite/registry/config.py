"""Where a registry lives and what it remembers: its location string, config and trusted keys.

A registry is a local directory (`config.json`, the SQLite index `index.sqlite`, `blobs/`), named by
a path or `sqlite:///DIR` (or `sqlite:///DIR/index.sqlite`), or an index on a PostgreSQL server
(`postgresql://...`), whose config is kept in the index itself and whose blobs must be given a home
(`--blobs` / $ADAPTERHUB_BLOBS: a shared folder or any fsspec URL) when it is created.

The config is one small JSON document: `{"schema_version": 1, "blobs": URL or null, "trusted_keys":
[...]}`. A trusted key is a 64-hex public key (trusted for every namespace, as registries always
stored them) or `{"public_key": hex, "namespaces": [...]}` (trusted only for those namespaces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_lite import atomic
from adapterhub_lite.db import SUPPORTED, is_url, redact
from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.registry.index import INDEX_FILE, Index
from adapterhub_lite.settings import env_name, settings, state_dir

ENV_REGISTRY = env_name("registry")
ENV_BLOBS = env_name("blobs")
CONFIG_FILE = "config.json"
CONFIG_FORMAT = 1
LOCATIONS = f"a registry directory, sqlite:///DIR, or {SUPPORTED.split(' or ')[-1]}"


def default_location() -> Path:
    return state_dir() / "registry"


@dataclass(frozen=True)
class Location:
    """A parsed registry location: a directory (SQLite index inside) or a database URL."""

    directory: Path | None
    index: str  # what `Index` opens: the index file's path, or the database URL
    shown: str  # for messages (password redacted)


def parse_location(raw: str | Path | None) -> Location:
    """Read a location string (> $ADAPTERHUB_REGISTRY > ~/.adapterhub/registry)."""
    text = str(raw or settings().registry or default_location())
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
        if Path(text).name == INDEX_FILE:
            text = str(Path(text).parent)
    elif text.split("://", 1)[0].lower() in ("postgresql", "postgres", "postgresql+psycopg"):
        return Location(None, text, redact(text))
    elif is_url(text):
        raise RegistryError(
            f"registry location {redact(text)!r}: unknown scheme {text.split('://', 1)[0]!r}",
            hint=f"use {LOCATIONS}; blobs alone can live in object storage (--blobs URL)",
            kind=ErrorKind.INVALID,
        )
    directory = Path(text).expanduser()
    return Location(directory, str(directory / INDEX_FILE), str(directory))


class ConfigStore:
    """The registry's config document: config.json in a directory, a row of the index otherwise."""

    def __init__(self, location: Location, index: Index) -> None:
        self.location, self.index = location, index
        self.file = location.directory / CONFIG_FILE if location.directory is not None else None

    def load(self) -> dict[str, Any] | None:
        """The config, or None if this registry was never created."""
        if self.file is not None:
            if not self.file.is_file():
                return None
            try:
                config = json.loads(self.file.read_text())
            except (OSError, ValueError) as exc:
                raise RegistryError(
                    f"{self.file}: unreadable registry config ({exc})",
                    hint="restore it from a backup",
                    kind=ErrorKind.INTERNAL,
                ) from None
            where = str(self.file)
        else:
            config = self.index.config()
            if config is None:
                return None
            where = self.location.shown
        fmt = config.get("schema_version") if isinstance(config, dict) else None
        if fmt != CONFIG_FORMAT:
            raise RegistryError(
                f"{where}: registry format {fmt!r} is not one this version of adapterhub-lite reads",
                hint="upgrade adapterhub-lite",
                kind=ErrorKind.INTERNAL,
            )
        return config

    def save(self, config: dict[str, Any]) -> None:
        if self.file is not None:
            try:
                atomic.write_json(self.file, config, durable=True)
            except OSError as exc:
                raise RegistryError(
                    f"cannot write {self.file}: {exc.strerror or exc}",
                    hint="check the registry directory's permissions and free space",
                    kind=ErrorKind.INTERNAL,
                ) from None
        else:
            self.index.put_config(config)


def new_config(blobs: str | None) -> dict[str, Any]:
    return {"schema_version": CONFIG_FORMAT, "blobs": blobs, "trusted_keys": []}


def with_trusted_key(config: dict[str, Any], public_hex: str, namespaces: list[str] | None) -> dict[str, Any]:
    """`config` with the key's entry replaced: unscoped (`namespaces` None) or scoped to exactly those."""
    kept = [
        e
        for e in config.get("trusted_keys", [])
        if (e.get("public_key") if isinstance(e, dict) else e) != public_hex
    ]
    entry: Any = (
        public_hex
        if namespaces is None
        else {"public_key": public_hex, "namespaces": sorted(set(namespaces))}
    )
    return {**config, "trusted_keys": [*kept, entry]}
