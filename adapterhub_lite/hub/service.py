"""What every route of the hub shares: the registry, tokens, uploads, serving copies and the catalog.

State besides the registry lives in the hub's state folder (default `<registry>/hub`): the token store,
upload temp files, and the serving copies of bundles.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from adapterhub_lite import keys
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest, parse_manifest
from adapterhub_lite.bundles.naming import Ref
from adapterhub_lite.bundles.naming import parse_ref as _parse_ref
from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.hub.access import Caller
from adapterhub_lite.hub.catalog import Catalog
from adapterhub_lite.hub.tokens import TOKENS_FILE, HubError, TokenStore
from adapterhub_lite.hub.upload import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_UPLOAD, UploadLimits, Uploads
from adapterhub_lite.registry.cache import BundleCache, Lease
from adapterhub_lite.registry.wire import MAX_RESULTS

logger = logging.getLogger("adapterhub.hub")
# A serving copy stays leased (never evicted) while a response reads it; a response that never reports
# back (a client gone, a bug) lets go of it after this long.
_SERVE_LEASE_S = 3600.0


def state_dir_for(registry_location: str | Path) -> Path:
    """The default state folder of a hub over a local registry directory."""
    return Path(registry_location) / "hub"


@dataclass
class HubConfig:
    state_dir: Path
    max_upload: int = DEFAULT_MAX_UPLOAD
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    # An upload's whole body must arrive within this (a trickle of one byte per idle period cannot
    # hold a slot for ever); uploads open at once, per token and in all.
    upload_deadline_s: float = UploadLimits.deadline_s
    uploads_per_token: int = UploadLimits.per_token
    uploads_total: int = UploadLimits.total
    cache_bytes: int = 20 * 1024**3  # the serving copies' bound (least recently used go first)
    concurrent_publishes: int = 2
    # vLLM's own validator on every publish (None: when vLLM is importable, as `verify` does).
    vllm_check: bool | None = None
    # The hub's address as its users reach it (shown in the catalog's commands); never the Host header.
    public_url: str = ""
    # Bases this hub serves (fingerprint -> directory): a publish for one of them is shape-checked
    # against it, and the version records the fingerprint.
    bases: dict[str, Path] = field(default_factory=dict)
    # The token store's database (a path or URL); None: `tokens.sqlite` in `state_dir`.
    tokens_db: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Hub:
    """What every route shares: the registry, tokens, uploads and serving copies."""

    def __init__(self, registry: Any, config: HubConfig) -> None:
        self.registry = registry
        self.config = config
        keep_private(registry, config.state_dir)
        self.tokens = TokenStore(config.tokens_db or config.state_dir / TOKENS_FILE)
        limits = UploadLimits(config.upload_deadline_s, config.uploads_per_token, config.uploads_total)
        self.uploads = Uploads(
            config.state_dir / "uploads", config.max_upload, config.idle_timeout_s, config.vllm_check, limits
        )
        # The serving copies: pulls are plain file reads; a publish leaves its verified upload here.
        self.cache = BundleCache(config.state_dir / "bundles", config.cache_bytes, bound_hint="retry shortly")
        self.publish_slots = anyio.Semaphore(config.concurrent_publishes)
        self.catalog = Catalog(lambda: self.versions(None), changed=_change_probe(registry))

    @staticmethod
    def parse_ref(ref: str) -> Ref:
        return _parse_ref(ref, HubError)

    def caller(self, authorization: str | None) -> Caller:
        if not authorization:
            return Caller()
        token = keys.bearer(authorization)
        if token is None:
            raise HubError("Authorization must be `Bearer TOKEN`", kind=ErrorKind.UNAUTHENTICATED)
        return Caller(self.tokens.check(token))

    def versions(self, namespace: str | None) -> list:
        return self.registry.versions(namespace)

    def search(
        self,
        caller: Caller,
        q: str,
        base: str | None,
        tag: str | None,
        limit: int = MAX_RESULTS,
        offset: int = 0,
    ) -> tuple[list, int]:
        """One page of what `caller` may see among the matches, and how many matches there are."""
        if caller.token is None:  # anonymous: the public snapshot needs no filtering
            rows = self.catalog.search(q, base=base, tag=tag, public_only=True)
        else:
            rows = caller.visible(self.registry, self.catalog.search(q, base=base, tag=tag))
        return rows[offset : offset + min(limit, MAX_RESULTS)], len(rows)

    def bundle(self, p: Any) -> Lease:
        """The serving copy of version `p` (pulled and verified from the registry on first request),
        leased: release it (`self.cache.release`) once the response that reads it is sent."""
        return self.cache.fetch(
            p.digest,
            lambda tmp: Path(self.registry.pull(p.ref, tmp / "bundle", vllm_check=False)),
            size=int(getattr(p, "size", 0) or 0),
            label=p.ref,
            seconds=_SERVE_LEASE_S,
        )

    def manifest_of(self, ref: str, bundle_dir: Path) -> Manifest:
        return parse_manifest((bundle_dir / MANIFEST_FILE).read_bytes(), f"{ref}:{MANIFEST_FILE}")

    def publish_checked(self, caller: Caller, staged: Any) -> tuple[Any, Path]:
        """Publish an upload (`uploads.Staged`) for `caller` (blocking); the verified bundle becomes a
        serving copy. The token is checked again here: one revoked while its upload streamed publishes
        nothing."""

        def authorize(namespace: str) -> None:
            if caller.token is not None:
                self.tokens.require_active(caller.token.id)
            caller.require_write(self.registry, namespace)

        published, bundle = self.uploads.publish(self.registry, staged, authorize, self.config.bases)
        try:  # the verified upload becomes the serving copy, moved in (not copied)
            self.cache.put(published.digest, lambda _tmp: bundle, label=published.ref)
        except (OSError, AdapterHubError) as exc:  # published all the same: the copy is pulled when asked
            logger.warning("hub: the serving copy of %s was not kept: %s", published.ref, exc)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)  # left only when the digest was already there
        self.catalog.refresh()
        return published, bundle


def keep_private(registry: Any, state_dir: Path) -> None:
    """Only the hub's own user may enter the folders that hold private weights, the index and the
    hub's state (the registry creates them with the usual 0755, for every local user to read)."""
    folders = [Path(state_dir)]
    where = getattr(registry, "where", None)
    if getattr(where, "directory", None) is not None:
        folders.append(Path(where.directory))
    blobs = getattr(registry, "blobs", None)
    if blobs is not None and type(getattr(blobs, "fs", None)).__name__ == "LocalFileSystem" and blobs.root:
        folders.append(Path(blobs.root))
    index_path = getattr(getattr(getattr(registry, "index", None), "db", None), "path", None)
    if index_path is not None:
        folders.append(Path(index_path).parent)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)


def _change_probe(registry: Any) -> Any:
    """The registry index's "did anything change?" probe, when it has one (a local `Registry`)."""
    db = getattr(getattr(registry, "index", None), "db", None)
    if db is None:
        return None
    from adapterhub_lite.db import ChangeFeed
    from adapterhub_lite.registry.index import CHANGES_CHANNEL

    return ChangeFeed(db, CHANGES_CHANNEL).version
