"""Publishing: verify a bundle, store every blob, then make the version visible in one transaction.

A process killed at any point leaves the version entirely visible or not at all; what it stored
before dying is an orphan that `check(repair=True)` removes. Versions are immutable: `name@version`
always means the same bytes (vLLM caches adapters by name).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path

from adapterhub_lite.bundles import archive as _archive
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest, parse_manifest
from adapterhub_lite.bundles.signing import SIGNATURES_FILE
from adapterhub_lite.bundles.verify import Precomputed, check_bundle
from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError
from adapterhub_lite.registry.faults import fault_point
from adapterhub_lite.registry.parts import RegistryParts
from adapterhub_lite.registry.records import Published


def publish(
    reg: RegistryParts,
    bundle_path: Path,
    progress: bool,
    *,
    precomputed: Precomputed | None = None,
    owned: bool = False,
    base_dir: Path | None = None,
    bases: Mapping[str, Path] | None = None,
) -> Published:
    """Verify and publish a bundle (directory or archive); idempotent for identical content
    (`precomputed`, `owned`, `base_dir` and `bases`: see `Registry.publish`)."""
    try:
        with tempfile.TemporaryDirectory(prefix="adapterhub-publish-") as td:
            try:
                shown_as = None
                if bundle_path.is_file():
                    bundle_dir = _archive.extract_archive(bundle_path, Path(td) / "bundle")
                    shown_as = str(bundle_path)  # errors name `bundle.tar:member`, not the temp folder
                else:
                    bundle_dir = bundle_path
                base = _base_for(bundle_dir, base_dir, bases)
                result = check_bundle(
                    bundle_dir,
                    base_dir=base[0] if base else None,
                    base_fingerprint=base[1] if base else None,
                    trusted_keys=reg.trusted.keys,
                    vllm_check=False,
                    shown_as=shown_as,
                    precomputed=precomputed if bundle_path.is_dir() else None,
                )
            except BundleError as exc:
                raise RegistryError(
                    f"refusing to publish {bundle_path}: {exc.message}", hint=exc.hint, kind=exc.kind
                ) from None
            link = owned and bundle_path.is_dir()
            checked = (result.base_checked,) if result.base_checked else ()
            return store_verified(
                reg, bundle_dir, result.manifest, progress, link=link, checked_bases=checked
            )
    except OSError as exc:
        raise RegistryError(
            f"cannot publish {bundle_path}: {exc}",
            hint="check the paths, permissions and free space of the blob store",
            kind=ErrorKind.INTERNAL,
        ) from None


def _base_for(
    bundle_dir: Path, base_dir: Path | None, bases: Mapping[str, Path] | None
) -> tuple[Path, str | None] | None:
    """The base to shape-check against: `base_dir` if given (a bundle for another base is refused),
    else the known base (`bases`: fingerprint -> directory) whose fingerprint the manifest names."""
    if base_dir is not None:
        return Path(base_dir), None  # check_bundle fingerprints it and refuses a mismatch
    if not bases:
        return None
    try:
        fp = parse_manifest((bundle_dir / MANIFEST_FILE).read_bytes(), MANIFEST_FILE).base.fingerprint
    except (OSError, BundleError):
        return None  # check_bundle names what is wrong with the manifest
    return (Path(bases[fp]), fp) if fp in bases else None


def immutable_error(m: Manifest, existing: str) -> RegistryError:
    return RegistryError(
        f"{m.ref} is already published with other content ({existing}); versions are immutable",
        hint="publish it under a new version (e.g. `adapterhub pack --version X.Y.Z`)",
        kind=ErrorKind.CONFLICT,
    )


def store_verified(
    reg: RegistryParts,
    bundle_dir: Path,
    m: Manifest,
    progress: bool = False,
    link: bool = False,
    checked_bases: tuple[str, ...] = (),
) -> Published:
    """Store a bundle whose manifest `m` was already verified and make it visible (the second half of
    `publish`; tests call it directly to plant content that publish's checks would refuse). `link`:
    the files are the caller's fsynced private copy; a local store hard-links them (no copy)."""
    from tqdm import tqdm

    existing = reg.index.digest_of(m.namespace, m.name, m.version)
    if existing is not None and existing != m.digest:
        raise immutable_error(m, existing)
    manifest_bytes = m.to_json()
    sig_path = bundle_dir / SIGNATURES_FILE
    sig_bytes = sig_path.read_bytes() if sig_path.is_file() else None
    # Checked on the very bytes that get stored (the file could change after verification), and
    # against the namespaces each trusted key may sign for.
    reg.trusted.require(sig_bytes, m.digest, m.namespace, f"refusing to publish {m.ref}")
    total = sum(f.size for f in m.files)
    fault_point("publish-start")
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"publish {m.ref}", disable=not progress) as bar:
        for f in m.files:
            reg.blobs.put_file(bundle_dir / f.path, f.sha256, bar.update, link=link)
        manifest_sha = reg.blobs.put_bytes(manifest_bytes)
        sig_sha = reg.blobs.put_bytes(sig_bytes) if sig_bytes is not None else None
    fault_point("blobs-stored")
    found = reg.index.add_version(m, manifest_sha, sig_sha, total, checked_bases)
    if found is not None and found != m.digest:
        raise immutable_error(m, found)  # lost the race to another content
    fault_point("committed")
    # A blob this publish found already stored may have been an orphan that a concurrent
    # `check --repair` removed before our commit; store it again so the version is whole.
    for f in m.files:
        if not reg.blobs.exists(f.sha256):
            reg.blobs.put_file(bundle_dir / f.path, f.sha256)
    for data in (manifest_bytes, sig_bytes):
        if data is not None and not reg.blobs.exists(hashlib.sha256(data).hexdigest()):
            reg.blobs.put_bytes(data)
    stored = reg.index.get(m.namespace, m.name, m.version)
    if stored is None:  # committed above; only a concurrent removal of the row gets here
        raise RegistryError(f"{m.ref} vanished from the index as it was published", kind=ErrorKind.INTERNAL)
    return stored
