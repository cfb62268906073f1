"""Pulling: copy a published version's blobs into a new bundle directory, verify it, then rename it
into place, so a reader never sees a half-written bundle."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest
from adapterhub_lite.bundles.signing import SIGNATURES_FILE
from adapterhub_lite.bundles.verify import check_bundle
from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError
from adapterhub_lite.registry.parts import RegistryParts
from adapterhub_lite.registry.records import Published


def pull(reg: RegistryParts, p: Published, dest: Path, verify: dict[str, Any], progress: bool) -> Path:
    """Fetch `p` into `dest` (created atomically) and verify it with `verify` (check_bundle's options);
    a `dest` that already holds the same bundle is verified and returned without a download."""
    try:
        return _pull(reg, p, dest, verify, progress)
    except OSError as exc:
        raise RegistryError(
            f"cannot pull {p.ref} into {dest}: {exc}",
            hint="check the destination's permissions and free space, and the blob store",
            kind=ErrorKind.INTERNAL,
        ) from None


def _pull(reg: RegistryParts, p: Published, dest: Path, verify: dict[str, Any], progress: bool) -> Path:
    from tqdm import tqdm

    if dest.exists():
        return _existing(reg, dest, p, verify)
    blobs = reg.index.blobs_of(p.id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        with tqdm(total=p.size, unit="B", unit_scale=True, desc=f"pull {p.ref}", disable=not progress) as bar:
            for path, sha in blobs:
                # p.size counts the listed files; the manifest and signatures are extra.
                listed = path not in (MANIFEST_FILE, SIGNATURES_FILE)
                reg.blobs.get_file(sha, tmp / path, bar.update if listed else None)
        try:
            m = check_bundle(tmp, **verify).manifest
        except BundleError as exc:
            raise RegistryError(
                f"{p.ref} failed verification after download: {exc.message}", hint=exc.hint, kind=exc.kind
            ) from None
        _signed_for_namespace(reg, tmp, m)
        if m.digest != p.digest:
            raise RegistryError(
                f"{p.ref}: downloaded bundle has digest {m.digest}, the index says {p.digest}",
                hint="run `adapterhub registry check`",
                kind=ErrorKind.INTERNAL,
            )
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, dest)
        except OSError:
            if dest.exists():  # a concurrent pull won the rename
                shutil.rmtree(tmp, ignore_errors=True)
                return _existing(reg, dest, p, verify)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _signed_for_namespace(reg: RegistryParts, bundle_dir: Path, m: Any) -> None:
    """With trusted keys, the bundle's signer must be trusted for its namespace (verify checked the
    signatures; the registry knows each key's namespaces)."""
    if reg.trusted.keys:
        sig = bundle_dir / SIGNATURES_FILE
        data = sig.read_bytes() if sig.is_file() else None
        reg.trusted.require(data, m.digest, m.namespace, f"{m.ref} cannot be pulled")


def existing_copy(dest: Path, p: Published, verify: dict[str, Any]) -> Manifest:
    """The manifest of a valid copy of `p` already at `dest`; CONFLICT if `dest` holds anything else."""
    try:
        m = check_bundle(dest, **verify).manifest
    except BundleError as exc:
        raise RegistryError(
            f"{dest} already exists and is not a valid copy of {p.ref}: {exc.message}",
            hint="remove it, or pull into another directory",
            kind=ErrorKind.CONFLICT,
        ) from None
    if m.digest != p.digest:
        raise RegistryError(
            f"{dest} already exists and holds {m.ref} ({m.digest}), not {p.ref}",
            hint="remove it, or pull into another directory",
            kind=ErrorKind.CONFLICT,
        )
    return m


def _existing(reg: RegistryParts, dest: Path, p: Published, verify: dict[str, Any]) -> Path:
    _signed_for_namespace(reg, dest, existing_copy(dest, p, verify))
    return dest


def read_manifest(reg: RegistryParts, p: Published):  # -> Manifest
    """The manifest of a published version, read from its blob and checked against its hash."""
    import hashlib

    from adapterhub_lite.bundles.manifest import parse_manifest

    sha = dict(reg.index.blobs_of(p.id))[MANIFEST_FILE]
    with reg.blobs.open(sha) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise RegistryError(
            f"the manifest blob of {p.ref} is corrupt",
            hint="run `adapterhub registry check`",
            kind=ErrorKind.INTERNAL,
        )
    return parse_manifest(data, f"{p.ref}:{MANIFEST_FILE}")
