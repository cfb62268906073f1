"""The marketplace's one entry point: `Registry`, a thin facade over the index, the blobs and the
publish, pull, access and check modules. Open one with `open_registry`, the one factory."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.manifest import Manifest
from adapterhub_lite.bundles.naming import check_name, semver_key
from adapterhub_lite.bundles.signing import PublicKeyLike
from adapterhub_lite.bundles.verify import Precomputed
from adapterhub_lite.errors import RegistryError
from adapterhub_lite.registry import access
from adapterhub_lite.registry import check as _check
from adapterhub_lite.registry import publish as _publish
from adapterhub_lite.registry import pull as _pull
from adapterhub_lite.registry.blobs import BlobStore
from adapterhub_lite.registry.config import ENV_REGISTRY, ConfigStore, Location, with_trusted_key
from adapterhub_lite.registry.index import Index
from adapterhub_lite.registry.records import CheckReport, Published, invalid, newest, ref_of
from adapterhub_lite.registry.trust import load_trust

DEFAULT_GRACE_S = _check.DEFAULT_GRACE_S
__all__ = ["DEFAULT_GRACE_S", "ENV_REGISTRY", "Registry"]  # ENV_REGISTRY: for registry/remote.py


class Registry:
    """An adapter registry: an index (SQLite or PostgreSQL) + content-addressed blobs."""

    def __init__(
        self, location: Location, index: Index, blobs: BlobStore, trusted_keys: Iterable[Any] | None = None
    ) -> None:
        self.where = location
        self.location = location.directory  # the registry directory (None for a database URL)
        self.shown = location.shown
        self.index = index
        self.blobs = blobs
        self.trusted = load_trust(trusted_keys)
        self.trusted_keys = self.trusted.keys  # for `verify_bundle`

    def trust(self, public_key: PublicKeyLike, namespaces: Iterable[str] | None = None) -> str:
        """Trust a public key for signing bundles of `namespaces` (None: every namespace); running it
        again replaces the key's namespaces. Returns the key id."""
        from adapterhub_lite.bundles.signing import key_id, load_public_key, public_hex

        key = load_public_key(public_key)
        scoped = None if namespaces is None else [check_name(n, "namespace", invalid) for n in namespaces]  # type: ignore[arg-type]
        store = ConfigStore(self.where, self.index)
        config = with_trusted_key(store.load() or {}, public_hex(key), scoped)
        store.save(config)
        self.trusted = load_trust(config["trusted_keys"])
        self.trusted_keys = self.trusted.keys
        return key_id(key)

    # -- publishing and pulling ----------------------------------------------------------------

    def publish(
        self,
        bundle_path: str | Path,
        *,
        progress: bool = False,
        precomputed: Precomputed | None = None,
        owned: bool = False,
        base_dir: str | Path | None = None,
        bases: Mapping[str, Path] | None = None,
    ) -> Published:
        """Verify and publish a bundle (directory or archive); idempotent for identical content.

        Another content under an existing `name@version` is a CONFLICT; of two concurrent publishes
        of one `name@version` with different content, exactly one wins. `precomputed` (hashes and the
        value scan taken while the files were written) spares verification a second read; `owned`
        says the directory is the caller's private, fsynced copy that nobody modifies any more (the
        hub's upload), so a local blob store takes its files by hard link instead of copying them.
        The weights are shape-checked against a base, and the version records its fingerprint
        (`checked_bases`): `base_dir` (a bundle for another base is refused), or the one of `bases`
        (fingerprint -> base directory, the bases a hub serves) the bundle names.
        """
        return _publish.publish(
            self,
            Path(bundle_path),
            progress,
            precomputed=precomputed,
            owned=owned,
            base_dir=Path(base_dir) if base_dir is not None else None,
            bases=bases,
        )

    def pull(
        self,
        ref: str,
        dest_dir: str | Path,
        *,
        base_fingerprint: str | None = None,
        max_lora_rank: int | None = None,
        vllm_check: bool | None = None,
        progress: bool = False,
    ) -> Path:
        """Fetch a version into the bundle directory `dest_dir` (created atomically) and verify it.

        `base_fingerprint`, `max_lora_rank` and `vllm_check` are passed to `verify_bundle`.
        """
        verify = dict(
            base_fingerprint=base_fingerprint,
            max_lora_rank=max_lora_rank,
            trusted_keys=self.trusted_keys,
            vllm_check=vllm_check,
        )
        return _pull.pull(self, self.resolve(ref), Path(dest_dir), verify, progress)

    def manifest(self, ref: str) -> Manifest:
        """The manifest of a published version (read from its blob and validated)."""
        return _pull.read_manifest(self, self.resolve(ref))

    # -- reading -------------------------------------------------------------------------------

    def resolve(self, ref: str) -> Published:
        """The version a reference names; `namespace/name` is the newest version not yanked."""
        r = ref_of(ref)
        if r.version:
            found = self.index.get(r.namespace, r.name, r.version)
            if found is not None:
                return found
        rows = self.index.versions_of(r.namespace, r.name)
        if r.version is None and (n := newest(p for p in rows if not p.yanked)):
            return n
        known = ", ".join(
            p.version + (" (yanked)" if p.yanked else "")
            for p in sorted(rows, key=lambda p: semver_key(p.version))
        )
        raise RegistryError(
            f"no {ref} in the registry at {self.shown}"
            + (" (every version is yanked)" if rows and r.version is None else ""),
            hint=f"published versions: {known}" if known else "see `adapterhub search` or `adapterhub list`",
        )

    def search(self, text: str = "", base: str | None = None, tag: str | None = None) -> list[Published]:
        """The newest non-yanked version of each adapter whose name, namespace, description or tags match."""
        return access.newest_of_each(self.index.search(text, base, tag))

    def versions(self, namespace: str | None = None) -> list[Published]:
        """Every version (yanked ones included, flagged), optionally of one namespace."""
        if namespace:
            check_name(namespace, "namespace", invalid)  # type: ignore[arg-type]
        rows = self.index.all_versions(namespace)
        return sorted(rows, key=lambda p: (p.namespace, p.name, semver_key(p.version)))

    def namespaces(self) -> list[str]:
        return self.index.namespaces()

    # -- changes -------------------------------------------------------------------------------

    def yank(self, ref: str, *, reason: str = "", undo: bool = False) -> Published:
        """Mark a version yanked (no longer the default for `namespace/name`; still pullable by version)."""
        r = ref_of(ref)
        if not r.version:
            raise invalid(f"yank needs an exact version, got {ref!r}", hint="use namespace/name@version")
        if not self.index.set_yanked(r.namespace, r.name, r.version, not undo, reason):
            raise RegistryError(f"no {ref} in the registry at {self.shown}")
        return self.resolve(ref)

    # -- access ----------------------------------------------------------------------------------

    def share(self, ref: str, with_namespace: str, *, revoke: bool = False) -> None:
        """Let another namespace read an adapter (all its versions), or revoke that."""
        access.share(self, ref, with_namespace, revoke)

    def shared_with(self, ref: str) -> list[str]:
        return access.shared_with(self, ref)

    def set_public(self, ref: str, public: bool = True) -> None:
        """Make an adapter (all its versions) readable by every namespace, or private again."""
        access.set_public(self, ref, public)

    def readable(self, namespace: str, base: str | None = None) -> list[Published]:
        """The newest non-yanked version of each adapter `namespace` may use (optionally for `base`)."""
        return access.readable(self, namespace, base)

    def can_read(self, namespace: str, ref: str) -> bool:
        """Whether `namespace` may use `ref`: its own, shared with it, or public (unknown refs: False)."""
        return access.can_read(self, namespace, ref)

    # -- maintenance -----------------------------------------------------------------------------

    def check(
        self, *, repair: bool = False, grace_s: float = DEFAULT_GRACE_S, deep: bool = False
    ) -> CheckReport:
        """Find orphaned, missing and (with `deep`) corrupt blobs and temp files of interrupted writes;
        `repair` removes orphans and temp files older than `grace_s`."""
        return _check.check(self, repair, grace_s, deep)
