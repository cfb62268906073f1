"""The marketplace: publish, resolve, pull, search, yank and share adapter bundles.

A registry is a local directory holding `config.json`, the SQLite index and (by default) `blobs/`; the
blobs can live in any fsspec filesystem instead. Publishing is atomic: every blob is stored first (each
one written to a temp name and renamed), then one index transaction makes the version visible. A process
killed at any point leaves the version entirely visible or not at all; what it stored before dying is an
orphan that `check(repair=True)` removes. Versions are immutable: `name@version` always means the same
bytes (vLLM caches adapters by name).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from adapterhub_lite.bundles import archive as _archive
from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest, parse_manifest
from adapterhub_lite.bundles.naming import Ref, check_name, semver_key
from adapterhub_lite.bundles.naming import parse_ref as _parse_ref
from adapterhub_lite.bundles.signing import SIGNATURES_FILE, PublicKeyLike, check_signatures, load_public_keys
from adapterhub_lite.bundles.verify import check_bundle
from adapterhub_lite.errors import BundleError, RegistryError
from adapterhub_lite.registry.blobs import BlobStore, checkpoint
from adapterhub_lite.registry.index import INDEX_FILE, Index

ENV_REGISTRY = "ADAPTERHUB_REGISTRY"
ENV_BLOBS = "ADAPTERHUB_BLOBS"
CONFIG_FILE = "config.json"
DEFAULT_GRACE_S = 3600.0


def default_location() -> Path:
    return Path.home() / ".adapterhub" / "registry"


def parse_ref(ref: str) -> Ref:
    """Parse `namespace/name@version` or `namespace/name` (newest version not yanked)."""
    return _parse_ref(ref, RegistryError)


def _write_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically (temp file in the same directory, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _now() -> str:
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
    id: int = field(default=0, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["tags"] = list(self.tags)
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

    @property
    def ok(self) -> bool:
        return self.index_ok and not (
            self.orphaned_blobs or self.missing_blobs or self.corrupt_blobs or self.stale_temp_files
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


_SELECT = """
SELECT v.*, p.public AS public,
       (SELECT group_concat(tag, ',') FROM (SELECT tag FROM tags t WHERE t.version_id = v.id ORDER BY tag))
           AS tag_list
FROM versions v JOIN packages p ON p.namespace = v.namespace AND p.name = v.name
"""


def _row(r: sqlite3.Row) -> Published:
    return Published(
        namespace=r["namespace"],
        name=r["name"],
        version=r["version"],
        digest=r["digest"],
        base_name=r["base_name"],
        base_fingerprint=r["base_fingerprint"],
        yanked=bool(r["yanked"]),
        public=bool(r["public"]),
        size=r["size"],
        rank=r["rank"],
        license=r["license"],
        description=r["description"],
        created=r["created"],
        published_at=r["published_at"],
        signed=r["signatures_sha256"] is not None,
        tags=tuple(filter(None, (r["tag_list"] or "").split(","))),
        yank_reason=r["yank_reason"],
        id=r["id"],
    )


def _newest(rows: Iterable[Published]) -> Published | None:
    rows = builtins.list(rows)
    releases = [p for p in rows if "-" not in p.version]
    pool = releases or rows  # pre-releases only when nothing else is left
    return max(pool, key=lambda p: semver_key(p.version)) if pool else None


class Registry:
    """An adapter registry: SQLite index + content-addressed blobs. Open it with `Registry.open`."""

    def __init__(self, location: Path, blobs: BlobStore, trusted_keys: builtins.list | None = None) -> None:
        self.location = location
        self.index = Index(location / INDEX_FILE)
        self.blobs = blobs
        self.trusted_keys = load_public_keys(trusted_keys)

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        location: str | Path | None = None,
        *,
        blobs: str | fsspec.AbstractFileSystem | None = None,
        trusted_keys: Iterable[PublicKeyLike] | None = None,
        create: bool = True,
    ) -> Registry:
        """Open (or create) the registry at `location` (> $ADAPTERHUB_REGISTRY > ~/.adapterhub/registry).

        `blobs` is where files are stored (default `<location>/blobs`; any fsspec URL, or a filesystem
        object); a URL given when the registry is created is remembered in its config.json.
        `trusted_keys` (default: those in config.json) makes publish and pull require a trusted signature.
        """
        raw = str(location or os.environ.get(ENV_REGISTRY) or default_location())
        if raw.startswith("file://"):
            raw = raw[len("file://") :]
        elif "://" in raw:
            raise RegistryError(
                f"registry location {raw!r}: the index is a SQLite file and needs a local directory",
                hint="use a local directory for the registry and put the blobs in object storage with "
                "--blobs URL (or $ADAPTERHUB_BLOBS)",
            )
        path = Path(raw).expanduser()
        config_path = path / CONFIG_FILE
        if blobs is None and os.environ.get(ENV_BLOBS):
            blobs = os.environ[ENV_BLOBS]
        if isinstance(blobs, str) and "://" not in blobs:
            blobs = str(Path(blobs).expanduser().resolve())  # recorded in config.json: must not depend on cwd
        if not config_path.is_file():
            if not create:
                raise RegistryError(
                    f"no registry at {path}",
                    hint="publish a bundle there first, or "
                    f"set --registry / ${ENV_REGISTRY} to an existing registry",
                )
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RegistryError(f"cannot create the registry at {path}: {exc}") from None
            config = {
                "schema_version": 1,
                "blobs": blobs if isinstance(blobs, str) else None,
                "trusted_keys": [],
            }
            Index(path / INDEX_FILE).create()
            _write_json(config_path, config)
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{config_path}: unreadable registry config ({exc})") from None
        fmt = config.get("schema_version") if isinstance(config, dict) else None
        if fmt != 1:
            raise RegistryError(
                f"{config_path}: registry format {fmt!r} is not one this version of adapterhub-lite reads",
                hint="upgrade adapterhub-lite",
            )
        recorded = config.get("blobs")
        if isinstance(blobs, str) and recorded and blobs != recorded:
            raise RegistryError(
                f"registry {path} stores its blobs in {recorded!r}, not {blobs!r}",
                hint="drop --blobs / $ADAPTERHUB_BLOBS, or use another registry directory",
            )
        store = BlobStore(blobs if blobs is not None else (recorded or str(path / "blobs")))
        keys = builtins.list(trusted_keys) if trusted_keys is not None else config.get("trusted_keys", [])
        return cls(path, store, keys)

    def trust(self, public_key: PublicKeyLike) -> str:
        """Add a public key to this registry's trusted keys (config.json); return its key id."""
        from adapterhub_lite.bundles.signing import key_id, load_public_key, public_hex

        key = load_public_key(public_key)
        config_path = self.location / CONFIG_FILE
        config = json.loads(config_path.read_text())
        hexes = config.setdefault("trusted_keys", [])
        if public_hex(key) not in hexes:
            hexes.append(public_hex(key))
        _write_json(config_path, config)
        self.trusted_keys = load_public_keys(hexes)
        return key_id(key)

    # ---------------------------------------------------------------- publish
    def publish(self, bundle_path: str | Path, *, progress: bool = False) -> Published:
        """Verify and publish a bundle (directory or archive); idempotent for identical content.

        Refuses (RegistryError) another content under an existing `name@version`; of two concurrent
        publishes of one `name@version` with different content, exactly one wins.
        """
        try:
            return self._publish(Path(bundle_path), progress)
        except OSError as exc:
            raise RegistryError(
                f"cannot publish {bundle_path}: {exc}",
                hint="check the paths, permissions and free space of the blob store",
            ) from None

    def _publish(self, bundle_path: Path, progress: bool) -> Published:
        with tempfile.TemporaryDirectory(prefix="adapterhub-publish-") as td:
            if bundle_path.is_file():
                bundle_dir = _archive.extract_archive(bundle_path, Path(td) / "bundle")
            else:
                bundle_dir = bundle_path
            try:
                result = check_bundle(bundle_dir, trusted_keys=self.trusted_keys, vllm_check=False)
            except BundleError as exc:
                raise RegistryError(
                    f"refusing to publish {bundle_path}: {exc.message}", hint=exc.hint
                ) from None
            return self._publish_verified(bundle_dir, result.manifest, progress)

    def _publish_verified(self, bundle_dir: Path, m: Manifest, progress: bool) -> Published:
        from tqdm import tqdm

        self._refuse_other_content(m)
        manifest_bytes = m.to_json()
        sig_bytes = None
        if (bundle_dir / SIGNATURES_FILE).is_file():
            sig_bytes = (bundle_dir / SIGNATURES_FILE).read_bytes()
            # Checked again on the very bytes that get stored (the file could change after verification).
            check_signatures(sig_bytes, m.digest, self.trusted_keys)
        total = sum(f.size for f in m.files)
        checkpoint("publish-start")
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"publish {m.ref}", disable=not progress
        ) as bar:
            for f in m.files:
                self.blobs.put_file(bundle_dir / f.path, f.sha256, bar.update)
            manifest_sha = self.blobs.put_bytes(manifest_bytes)
            sig_sha = self.blobs.put_bytes(sig_bytes) if sig_bytes is not None else None
        checkpoint("blobs-stored")
        with self.index.write() as con:
            row = con.execute(
                "SELECT digest FROM versions WHERE namespace=? AND name=? AND version=?",
                (m.namespace, m.name, m.version),
            ).fetchone()
            if row is None:
                con.execute(
                    "INSERT OR IGNORE INTO packages (namespace, name, public, created_at) VALUES (?,?,0,?)",
                    (m.namespace, m.name, _now()),
                )
                cur = con.execute(
                    "INSERT INTO versions (namespace, name, version, digest, manifest_sha256,"
                    " signatures_sha256, base_name, base_fingerprint, description, license, rank, size,"
                    " created, published_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        m.namespace,
                        m.name,
                        m.version,
                        m.digest,
                        manifest_sha,
                        sig_sha,
                        m.base.name,
                        m.base.fingerprint,
                        m.description,
                        m.license,
                        m.adapter.rank,
                        total,
                        m.created,
                        _now(),
                    ),
                )
                vid = cur.lastrowid
                con.executemany(
                    "INSERT INTO files (version_id, path, sha256, size) VALUES (?,?,?,?)",
                    [(vid, f.path, f.sha256, f.size) for f in m.files],
                )
                con.executemany("INSERT INTO tags (version_id, tag) VALUES (?,?)", [(vid, t) for t in m.tags])
                checkpoint("before-commit")
            elif row["digest"] != m.digest:
                raise self._immutable_error(m, row["digest"])
        checkpoint("committed")
        # A blob this publish found already stored may have been an orphan that a concurrent
        # `check --repair` removed before our commit; store it again so the version is whole.
        for f in m.files:
            if not self.blobs.exists(f.sha256):
                self.blobs.put_file(bundle_dir / f.path, f.sha256)
        for data in (manifest_bytes, sig_bytes):
            if data is not None and not self.blobs.exists(hashlib.sha256(data).hexdigest()):
                self.blobs.put_bytes(data)
        return self.resolve(m.ref)

    def _refuse_other_content(self, m: Manifest) -> None:
        with self.index.read() as con:
            row = con.execute(
                "SELECT digest FROM versions WHERE namespace=? AND name=? AND version=?",
                (m.namespace, m.name, m.version),
            ).fetchone()
        if row is not None and row["digest"] != m.digest:
            raise self._immutable_error(m, row["digest"])

    def _immutable_error(self, m: Manifest, existing: str) -> RegistryError:
        return RegistryError(
            f"{m.ref} is already published with other content ({existing}); versions are immutable",
            hint="publish it under a new version (e.g. `adapterhub pack --version X.Y.Z`)",
        )

    # ---------------------------------------------------------------- reading
    def resolve(self, ref: str) -> Published:
        """The version a reference names; `namespace/name` is the newest version not yanked."""
        r = parse_ref(ref)
        with self.index.read() as con:
            if r.version:
                row = con.execute(
                    _SELECT + " WHERE v.namespace=? AND v.name=? AND v.version=?",
                    (r.namespace, r.name, r.version),
                ).fetchone()
                if row is not None:
                    return _row(row)
            rows = [
                _row(x)
                for x in con.execute(_SELECT + " WHERE v.namespace=? AND v.name=?", (r.namespace, r.name))
            ]
        if r.version is None:
            newest = _newest(p for p in rows if not p.yanked)
            if newest:
                return newest
        known = ", ".join(
            p.version + (" (yanked)" if p.yanked else "")
            for p in sorted(rows, key=lambda p: semver_key(p.version))
        )
        raise RegistryError(
            f"no {ref} in the registry at {self.location}"
            + (" (every version is yanked)" if rows and r.version is None else ""),
            hint=f"published versions: {known}" if known else "see `adapterhub search` or `adapterhub list`",
        )

    def manifest(self, ref: str) -> Manifest:
        """The manifest of a published version (read from its blob and validated)."""
        p = self.resolve(ref)
        with self.index.read() as con:
            sha = con.execute("SELECT manifest_sha256 FROM versions WHERE id=?", (p.id,)).fetchone()[0]
        with self.blobs.open(sha) as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != sha:
            raise RegistryError(
                f"the manifest blob of {p.ref} is corrupt", hint="run `adapterhub registry check`"
            )
        return parse_manifest(data, f"{p.ref}:{MANIFEST_FILE}")

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

        If `dest_dir` already holds the same bundle it is verified and returned without a download.
        `base_fingerprint`, `max_lora_rank` and `vllm_check` are passed to `verify_bundle`.
        """
        p = self.resolve(ref)
        verify = dict(
            base_fingerprint=base_fingerprint,
            max_lora_rank=max_lora_rank,
            trusted_keys=self.trusted_keys,
            vllm_check=vllm_check,
        )
        try:
            return self._pull(p, Path(dest_dir), verify, progress)
        except OSError as exc:
            raise RegistryError(
                f"cannot pull {p.ref} into {dest_dir}: {exc}",
                hint="check the destination's permissions and free space, and the blob store",
            ) from None

    def _pull(self, p: Published, dest: Path, verify: dict, progress: bool) -> Path:
        from tqdm import tqdm

        if dest.exists():
            return self._existing(dest, p, verify)
        with self.index.read() as con:
            v = con.execute(
                "SELECT manifest_sha256, signatures_sha256 FROM versions WHERE id=?", (p.id,)
            ).fetchone()
            files = [
                (r["path"], r["sha256"])
                for r in con.execute(
                    "SELECT path, sha256 FROM files WHERE version_id=? ORDER BY path", (p.id,)
                )
            ]
        files.append((MANIFEST_FILE, v["manifest_sha256"]))
        if v["signatures_sha256"]:
            files.append((SIGNATURES_FILE, v["signatures_sha256"]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            with tqdm(
                total=p.size, unit="B", unit_scale=True, desc=f"pull {p.ref}", disable=not progress
            ) as bar:
                for path, sha in files:
                    # p.size counts the listed files; the manifest and signatures are extra.
                    listed = path not in (MANIFEST_FILE, SIGNATURES_FILE)
                    self.blobs.get_file(sha, tmp / path, bar.update if listed else None)
            try:
                m = check_bundle(tmp, **verify).manifest
            except BundleError as exc:
                raise RegistryError(
                    f"{p.ref} failed verification after download: {exc.message}", hint=exc.hint
                ) from None
            if m.digest != p.digest:
                raise RegistryError(
                    f"{p.ref}: downloaded bundle has digest {m.digest}, the index says {p.digest}",
                    hint="run `adapterhub registry check`",
                )
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, dest)
            except OSError:
                if dest.exists():  # a concurrent pull won the rename
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self._existing(dest, p, verify)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _existing(self, dest: Path, p: Published, verify: dict) -> Path:
        try:
            m = check_bundle(dest, **verify).manifest
        except BundleError as exc:
            raise RegistryError(
                f"{dest} already exists and is not a valid copy of {p.ref}: {exc.message}",
                hint="remove it, or pull into another directory",
            ) from None
        if m.digest != p.digest:
            raise RegistryError(
                f"{dest} already exists and holds {m.ref} ({m.digest}), not {p.ref}",
                hint="remove it, or pull into another directory",
            )
        return dest

    def search(
        self, text: str = "", base: str | None = None, tag: str | None = None
    ) -> builtins.list[Published]:
        """The newest non-yanked version of each adapter whose name, namespace, description or tags match."""
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{escaped}%"
        sql = (
            _SELECT + " WHERE v.yanked = 0 AND (lower(v.namespace || '/' || v.name) LIKE ? ESCAPE '\\' "
            "OR lower(v.description) LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM tags t "
            "WHERE t.version_id = v.id AND t.tag LIKE ? ESCAPE '\\'))"
        )
        args: builtins.list[Any] = [like, like, like]
        if base:
            sql += " AND v.base_fingerprint = ?"
            args.append(base)
        if tag:
            sql += " AND EXISTS (SELECT 1 FROM tags t WHERE t.version_id = v.id AND t.tag = ?)"
            args.append(tag)
        return self._newest_of_each(sql, args)

    def _newest_of_each(self, sql: str, args: builtins.list[Any]) -> builtins.list[Published]:
        """The newest version of each package among the rows `sql` selects, in package order."""
        with self.index.read() as con:
            rows = [_row(r) for r in con.execute(sql, args)]
        by_package: dict[tuple[str, str], builtins.list[Published]] = {}
        for p in rows:
            by_package.setdefault((p.namespace, p.name), []).append(p)
        return [n for _, ps in sorted(by_package.items()) if (n := _newest(ps))]

    def list(self, namespace: str | None = None) -> builtins.list[Published]:
        """Every version (yanked ones included, flagged), optionally of one namespace."""
        with self.index.read() as con:
            if namespace:
                check_name(namespace, "namespace", RegistryError)
                rows = con.execute(_SELECT + " WHERE v.namespace = ?", (namespace,))
            else:
                rows = con.execute(_SELECT)
            out = [_row(r) for r in rows]
        return sorted(out, key=lambda p: (p.namespace, p.name, semver_key(p.version)))

    def namespaces(self) -> builtins.list[str]:
        with self.index.read() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT namespace FROM packages ORDER BY namespace")]

    # ---------------------------------------------------------------- changes
    def yank(self, ref: str, *, reason: str = "", undo: bool = False) -> Published:
        """Mark a version yanked (no longer the default for `namespace/name`; still pullable by version)."""
        r = parse_ref(ref)
        if not r.version:
            raise RegistryError(
                f"yank needs an exact version, got {ref!r}", hint="use namespace/name@version"
            )
        with self.index.write() as con:
            cur = con.execute(
                "UPDATE versions SET yanked=?, yank_reason=? WHERE namespace=? AND name=? AND version=?",
                (0 if undo else 1, "" if undo else reason, r.namespace, r.name, r.version),
            )
            if cur.rowcount == 0:
                raise RegistryError(f"no {ref} in the registry at {self.location}")
        return self.resolve(ref)

    def _package(self, con: sqlite3.Connection, ref: str) -> Ref:
        r = parse_ref(ref)
        if con.execute(
            "SELECT 1 FROM packages WHERE namespace=? AND name=?", (r.namespace, r.name)
        ).fetchone():
            return r
        raise RegistryError(f"no adapter {r.package} in the registry at {self.location}")

    def share(self, ref: str, with_namespace: str, *, revoke: bool = False) -> None:
        """Let another namespace read an adapter (all its versions), or revoke that."""
        check_name(with_namespace, "namespace", RegistryError)
        with self.index.write() as con:
            r = self._package(con, ref)
            if revoke:
                con.execute(
                    "DELETE FROM shares WHERE namespace=? AND name=? AND grantee=?",
                    (r.namespace, r.name, with_namespace),
                )
            else:
                con.execute(
                    "INSERT OR IGNORE INTO shares (namespace, name, grantee) VALUES (?,?,?)",
                    (r.namespace, r.name, with_namespace),
                )

    def shared_with(self, ref: str) -> builtins.list[str]:
        r = parse_ref(ref)
        with self.index.read() as con:
            return [
                x[0]
                for x in con.execute(
                    "SELECT grantee FROM shares WHERE namespace=? AND name=? ORDER BY grantee",
                    (r.namespace, r.name),
                )
            ]

    def set_public(self, ref: str, public: bool = True) -> None:
        """Make an adapter (all its versions) readable by every namespace, or private again."""
        with self.index.write() as con:
            r = self._package(con, ref)
            con.execute(
                "UPDATE packages SET public=? WHERE namespace=? AND name=?",
                (int(public), r.namespace, r.name),
            )

    def readable(self, namespace: str, base: str | None = None) -> builtins.list[Published]:
        """The newest non-yanked version of each adapter `namespace` may use: its own, shared with it,
        or public; with `base`, only adapters for that base fingerprint."""
        sql = (
            _SELECT + " WHERE v.yanked = 0 AND (v.namespace = ? OR p.public = 1 OR EXISTS (SELECT 1 FROM "
            "shares s WHERE s.namespace = v.namespace AND s.name = v.name AND s.grantee = ?))"
        )
        args: builtins.list[Any] = [namespace, namespace]
        if base:
            sql += " AND v.base_fingerprint = ?"
            args.append(base)
        return self._newest_of_each(sql, args)

    def can_read(self, namespace: str, ref: str) -> bool:
        """Whether `namespace` may use `ref`: its own, shared with it, or public (unknown refs: False)."""
        try:
            r = parse_ref(ref)
        except RegistryError:
            return False
        with self.index.read() as con:
            row = con.execute(
                "SELECT p.public, EXISTS (SELECT 1 FROM shares s WHERE s.namespace=p.namespace"
                " AND s.name=p.name AND s.grantee=?) FROM packages p WHERE p.namespace=? AND p.name=?",
                (namespace, r.namespace, r.name),
            ).fetchone()
            if row is None:
                return False
            if (
                r.version
                and not con.execute(
                    "SELECT 1 FROM versions WHERE namespace=? AND name=? AND version=?",
                    (r.namespace, r.name, r.version),
                ).fetchone()
            ):
                return False
        return r.namespace == namespace or bool(row[0]) or bool(row[1])

    # ---------------------------------------------------------------- maintenance
    def check(
        self, *, repair: bool = False, grace_s: float = DEFAULT_GRACE_S, deep: bool = False
    ) -> CheckReport:
        """Find orphaned blobs (stored, referenced by no version), missing and (with `deep`) corrupt blobs,
        and temp files of interrupted writes. `repair` removes orphans and temp files older than `grace_s`
        (younger ones may belong to a publish in progress); a missing blob is restored by publishing the
        bundle again.
        """
        report = CheckReport()
        with self.index.read() as con:
            report.index_ok = con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            refs: dict[str, builtins.list[str]] = {}
            for r in con.execute(
                "SELECT f.sha256, v.namespace || '/' || v.name || '@' || v.version || ':' || f.path "
                "FROM files f JOIN versions v ON v.id = f.version_id "
                "UNION ALL SELECT manifest_sha256, namespace || '/' || name || '@' || version "
                "|| ':manifest.json' FROM versions "
                "UNION ALL SELECT signatures_sha256, namespace || '/' || name || '@' || version "
                "|| ':signatures.json' FROM versions WHERE signatures_sha256 IS NOT NULL"
            ):
                refs.setdefault(r[0], []).append(r[1])
        stored = {b.sha256: b for b in self.blobs.blobs() if b.sha256}
        for b in self.blobs.blobs():
            if b.sha256 is None or b.sha256 not in refs:
                report.orphaned_blobs.append(b.path)
                if repair and b.age_s >= grace_s:
                    self.blobs.remove(b.path)
                    report.removed.append(b.path)
                elif repair:
                    report.kept_recent.append(b.path)
        for t in self.blobs.temp_files():
            report.stale_temp_files.append(t.path)
            if repair and t.age_s >= grace_s:
                self.blobs.remove(t.path)
                report.removed.append(t.path)
            elif repair:
                report.kept_recent.append(t.path)
        for sha, where in sorted(refs.items()):
            if sha not in stored:
                report.missing_blobs.extend({"blob": f"sha256:{sha}", "file": w} for w in where)
            elif deep and self.blobs.hash_blob(sha) != sha:
                report.corrupt_blobs.append(stored[sha].path)
        return report
