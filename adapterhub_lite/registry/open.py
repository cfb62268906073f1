"""Opening a registry from a location string: the one factory the CLI and the serving resolver call."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec

from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.registry.blobs import BlobStore
from adapterhub_lite.registry.config import (
    ENV_BLOBS,
    ENV_REGISTRY,
    ConfigStore,
    new_config,
    parse_location,
)
from adapterhub_lite.registry.index import Index
from adapterhub_lite.registry.registry import Registry
from adapterhub_lite.settings import settings


def open_registry(
    location: str | Path | None = None,
    *,
    blobs: str | fsspec.AbstractFileSystem | None = None,
    trusted_keys: Iterable[Any] | None = None,
    create: bool = True,
) -> Registry:
    """Open (or create) the registry at `location` (> $ADAPTERHUB_REGISTRY > ~/.adapterhub/registry).

    `location` is a directory, `sqlite:///DIR` or `postgresql://...` (see `registry.config`), or a hub
    URL `http(s)://...`, which gives a `remote.RemoteRegistry` with the same interface.
    `blobs` is where files are stored (default `<directory>/blobs`; any fsspec URL, or a filesystem
    object; required to create a registry on a database server); a URL given when the registry is
    created is remembered in its config. `trusted_keys` (default: the config's) makes publish and pull
    require a trusted signature.
    """
    env = settings()
    raw = location if location is not None else env.registry
    if isinstance(raw, str) and raw.startswith(("http://", "https://")):
        # A hub: the same interface over HTTP (token from $ADAPTERHUB_TOKEN or `adapterhub login`).
        from adapterhub_lite.registry.remote import RemoteRegistry

        return RemoteRegistry(raw, trusted_keys=trusted_keys)  # type: ignore[return-value]
    where = parse_location(location)
    if blobs is None and env.blobs:
        blobs = env.blobs
    if isinstance(blobs, str) and "://" not in blobs:
        blobs = str(Path(blobs).expanduser().resolve())  # recorded in the config: must not depend on cwd
    if where.directory is not None and not (where.directory / "config.json").is_file():
        if not create:
            raise RegistryError(
                f"no registry at {where.shown}",
                hint="publish a bundle there first, or set --registry / "
                f"${ENV_REGISTRY} to an existing registry",
            )
        try:
            where.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(
                f"cannot create the registry at {where.shown}: {exc.strerror or exc}",
                hint="check the path and its permissions",
                kind=ErrorKind.INTERNAL,
            ) from None
    index = Index(where.index)
    index.create()  # creates, upgrades, or refuses a schema newer than this code
    store = ConfigStore(where, index)
    config = store.load()
    if config is None:
        if not create:
            raise RegistryError(
                f"no registry at {where.shown}",
                hint=f"create it first (publish to it with --blobs), or set --registry / ${ENV_REGISTRY}",
            )
        if where.directory is None and not isinstance(blobs, str):
            raise RegistryError(
                f"the registry at {where.shown} is new and needs a home for its blobs",
                hint=f"pass --blobs DIR-or-URL (or set ${ENV_BLOBS}) once, when creating it: a folder "
                "every machine sees, or object storage (s3://..., gs://...)",
                kind=ErrorKind.INVALID,
            )
        config = new_config(blobs if isinstance(blobs, str) else None)
        store.save(config)
    recorded = config.get("blobs")
    if isinstance(blobs, str) and recorded and blobs != recorded:
        raise RegistryError(
            f"registry {where.shown} stores its blobs in {recorded!r}, not {blobs!r}",
            hint=f"drop --blobs / ${ENV_BLOBS}, or use another registry",
            kind=ErrorKind.CONFLICT,
        )
    default_blobs = str(where.directory / "blobs") if where.directory is not None else None
    target = blobs if blobs is not None else (recorded or default_blobs)
    keys = list(trusted_keys) if trusted_keys is not None else config.get("trusted_keys", [])
    return Registry(where, index, BlobStore(target), keys)
