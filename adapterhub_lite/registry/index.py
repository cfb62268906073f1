"""The registry index: every SQL statement of the registry, on SQLite (default) or PostgreSQL.

Versions, their files and tags, packages (visibility) and shares. Each method is one transaction. On
SQLite writers queue (BEGIN IMMEDIATE) and WAL lets readers (the serving plugin) run while a publish
writes; on PostgreSQL the unique key on (namespace, name, version) decides a publish race.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Row

from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest
from adapterhub_lite.bundles.signing import SIGNATURES_FILE
from adapterhub_lite.db import Database, meta_table, migrate
from adapterhub_lite.errors import RegistryError
from adapterhub_lite.registry.faults import fault_point
from adapterhub_lite.registry.records import Published, now

INDEX_FILE = "index.sqlite"
CHANGES_CHANNEL = "adapterhub_registry"  # notified by every write (for `db.ChangeFeed` readers)
SCHEMA_VERSION = 2  # 2: versions.checked_bases

metadata = sa.MetaData()
meta = meta_table(metadata)
packages = sa.Table(
    "packages",
    metadata,
    sa.Column("namespace", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("public", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Text, nullable=False),
)
versions = sa.Table(
    "versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("manifest_sha256", sa.Text, nullable=False),
    sa.Column("signatures_sha256", sa.Text),
    sa.Column("base_name", sa.Text, nullable=False),
    sa.Column("base_fingerprint", sa.Text, nullable=False, index=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("license", sa.Text, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Text, nullable=False),
    sa.Column("published_at", sa.Text, nullable=False),
    sa.Column("yanked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("yank_reason", sa.Text, nullable=False, server_default=""),
    # Base fingerprints publish shape-checked the weights against (comma-separated; "" for none).
    sa.Column("checked_bases", sa.Text, nullable=False, server_default=""),
    sa.UniqueConstraint("namespace", "name", "version"),
    sa.ForeignKeyConstraint(["namespace", "name"], ["packages.namespace", "packages.name"]),
)
files = sa.Table(
    "files",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("sha256", sa.Text, nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
)
tags = sa.Table(
    "tags",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
)
shares = sa.Table(
    "shares",
    metadata,
    sa.Column("namespace", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("grantee", sa.Text, primary_key=True),
)

_v, _p = versions.c, packages.c


def _select() -> sa.Select:
    tag_list = (
        sa.select(sa.func.aggregate_strings(tags.c.tag, ","))
        .where(tags.c.version_id == _v.id)
        .scalar_subquery()
        .label("tag_list")
    )
    return sa.select(versions, _p.public, tag_list).join(
        packages, sa.and_(_p.namespace == _v.namespace, _p.name == _v.name)
    )


def _row(r: Row) -> Published:
    m = r._mapping
    return Published(
        namespace=m["namespace"],
        name=m["name"],
        version=m["version"],
        digest=m["digest"],
        base_name=m["base_name"],
        base_fingerprint=m["base_fingerprint"],
        yanked=bool(m["yanked"]),
        public=bool(m["public"]),
        size=m["size"],
        rank=m["rank"],
        license=m["license"],
        description=m["description"],
        created=m["created"],
        published_at=m["published_at"],
        signed=m["signatures_sha256"] is not None,
        tags=tuple(sorted(filter(None, (m["tag_list"] or "").split(",")))),
        yank_reason=m["yank_reason"],
        checked_bases=tuple(filter(None, (m["checked_bases"] or "").split(","))),
        id=m["id"],
    )


def _one_version(ns: str, name: str, version: str) -> sa.ColumnElement[bool]:
    return sa.and_(_v.namespace == ns, _v.name == name, _v.version == version)


class Index:
    """The index database at `location` (a SQLite file path or a PostgreSQL URL)."""

    def __init__(self, location: str) -> None:
        self.db = Database(location, error=RegistryError, what="registry index")

    @property
    def shown(self) -> str:
        return self.db.shown

    def create(self) -> None:
        """Create the schema, or upgrade it; refuses a database newer than this code."""
        migrate(self.db, metadata, SCHEMA_VERSION, {2: _upgrade_to_2}, legacy=_legacy_version)

    def check_schema(self) -> None:
        """Refuse to work on a database whose schema is newer than this code (no writes)."""
        self.create()

    # -- settings (registries whose index is a server keep their config here) -------------------

    def config(self) -> dict[str, Any] | None:
        with self.db.read() as con:
            raw = con.execute(sa.select(meta.c.value).where(meta.c.key == "config")).scalar()
        return json.loads(raw) if raw is not None else None

    def put_config(self, config: dict[str, Any]) -> None:
        with self.db.write() as con:
            self.db.notify(con, CHANGES_CHANNEL)
            con.execute(sa.delete(meta).where(meta.c.key == "config"))
            con.execute(sa.insert(meta).values(key="config", value=json.dumps(config)))

    # -- publishing ----------------------------------------------------------------------------

    def digest_of(self, ns: str, name: str, version: str) -> str | None:
        with self.db.read() as con:
            return con.execute(sa.select(_v.digest).where(_one_version(ns, name, version))).scalar()

    def add_version(
        self,
        m: Manifest,
        manifest_sha: str,
        sig_sha: str | None,
        size: int,
        checked_bases: tuple[str, ...] = (),
    ) -> str | None:
        """Record a version in one transaction; returns None, or the digest already recorded under
        its `name@version` (by an earlier or a concurrent publish: the caller decides).
        `checked_bases`: the base fingerprints its weights were shape-checked against."""
        try:
            with self.db.write() as con:
                self.db.notify(con, CHANGES_CHANNEL)
                found = con.execute(
                    sa.select(_v.digest).where(_one_version(m.namespace, m.name, m.version))
                ).scalar()
                if found is not None:
                    return found
                if not con.execute(
                    sa.select(_p.name).where(_p.namespace == m.namespace, _p.name == m.name)
                ).first():
                    con.execute(
                        sa.insert(packages).values(namespace=m.namespace, name=m.name, created_at=now())
                    )
                vid = con.execute(
                    sa.insert(versions)
                    .values(
                        namespace=m.namespace,
                        name=m.name,
                        version=m.version,
                        digest=m.digest,
                        manifest_sha256=manifest_sha,
                        signatures_sha256=sig_sha,
                        base_name=m.base.name,
                        base_fingerprint=m.base.fingerprint,
                        description=m.description,
                        license=m.license,
                        rank=m.adapter.rank,
                        size=size,
                        created=m.created,
                        published_at=now(),
                        checked_bases=",".join(checked_bases),
                    )
                    .returning(_v.id)
                ).scalar_one()
                con.execute(
                    sa.insert(files),
                    [
                        {"version_id": vid, "path": f.path, "sha256": f.sha256, "size": f.size}
                        for f in m.files
                    ],
                )
                if m.tags:
                    con.execute(sa.insert(tags), [{"version_id": vid, "tag": t} for t in m.tags])
                fault_point("before-commit")
        except exc.IntegrityError:
            # A concurrent publish committed the same package or version first (PostgreSQL; SQLite
            # writers queue instead). Whatever it recorded is now visible: let the caller compare.
            found = self.digest_of(m.namespace, m.name, m.version)
            if found is None:
                # Only the package row raced: try again.
                return self.add_version(m, manifest_sha, sig_sha, size, checked_bases)
            return found
        return None

    # -- reading -------------------------------------------------------------------------------

    def get(self, ns: str, name: str, version: str) -> Published | None:
        with self.db.read() as con:
            row = con.execute(_select().where(_one_version(ns, name, version))).first()
        return _row(row) if row is not None else None

    def versions_of(self, ns: str, name: str) -> list[Published]:
        with self.db.read() as con:
            return [_row(r) for r in con.execute(_select().where(_v.namespace == ns, _v.name == name))]

    def all_versions(self, namespace: str | None = None) -> list[Published]:
        q = _select()
        if namespace:
            q = q.where(_v.namespace == namespace)
        with self.db.read() as con:
            return [_row(r) for r in con.execute(q)]

    def namespaces(self) -> list[str]:
        with self.db.read() as con:
            return list(con.execute(sa.select(_p.namespace).distinct().order_by(_p.namespace)).scalars())

    def search(self, text: str, base: str | None, tag: str | None) -> list[Published]:
        """Non-yanked versions whose name, description or a tag contains `text` (literally)."""
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{escaped}%"
        has_tag = sa.exists().where(tags.c.version_id == _v.id, tags.c.tag.like(like, escape="\\"))
        q = _select().where(
            _v.yanked == 0,
            sa.or_(
                sa.func.lower(_v.namespace + "/" + _v.name).like(like, escape="\\"),
                sa.func.lower(_v.description).like(like, escape="\\"),
                has_tag,
            ),
        )
        if base:
            q = q.where(_v.base_fingerprint == base)
        if tag:
            q = q.where(sa.exists().where(tags.c.version_id == _v.id, tags.c.tag == tag))
        with self.db.read() as con:
            return [_row(r) for r in con.execute(q)]

    def readable(self, namespace: str, base: str | None) -> list[Published]:
        """Non-yanked versions `namespace` owns, is shared or are public (optionally for `base`)."""
        shared = sa.exists().where(
            shares.c.namespace == _v.namespace, shares.c.name == _v.name, shares.c.grantee == namespace
        )
        q = _select().where(_v.yanked == 0, sa.or_(_v.namespace == namespace, _p.public == 1, shared))
        if base:
            q = q.where(_v.base_fingerprint == base)
        with self.db.read() as con:
            return [_row(r) for r in con.execute(q)]

    def access(self, reader: str, ns: str, name: str, version: str | None) -> bool:
        """Whether `reader` may read `ns/name` (at `version`, which must exist, if given)."""
        shared = (
            sa.exists()
            .where(shares.c.namespace == _p.namespace, shares.c.name == _p.name, shares.c.grantee == reader)
            .label("shared")
        )
        with self.db.read() as con:
            row = con.execute(sa.select(_p.public, shared).where(_p.namespace == ns, _p.name == name)).first()
            if row is None:
                return False
            if (
                version
                and con.execute(sa.select(_v.id).where(_one_version(ns, name, version))).first() is None
            ):
                return False
        return ns == reader or bool(row[0]) or bool(row[1])

    def blobs_of(self, version_id: int) -> list[tuple[str, str]]:
        """(path, sha256) of every file of a version, the manifest and signatures included."""
        with self.db.read() as con:
            v = con.execute(
                sa.select(_v.manifest_sha256, _v.signatures_sha256).where(_v.id == version_id)
            ).one()
            out = [
                (r.path, r.sha256)
                for r in con.execute(
                    sa.select(files.c.path, files.c.sha256)
                    .where(files.c.version_id == version_id)
                    .order_by(files.c.path)
                )
            ]
        out.append((MANIFEST_FILE, v.manifest_sha256))
        if v.signatures_sha256:
            out.append((SIGNATURES_FILE, v.signatures_sha256))
        return out

    def blob_refs(self) -> dict[str, list[str]]:
        """sha256 -> the `ref:path` names of every stored file that uses it."""
        refs: dict[str, list[str]] = {}
        with self.db.read() as con:
            rows = con.execute(
                sa.select(files.c.sha256, _v.namespace, _v.name, _v.version, files.c.path).join(
                    versions, _v.id == files.c.version_id
                )
            ).all()
            heads = con.execute(
                sa.select(_v.namespace, _v.name, _v.version, _v.manifest_sha256, _v.signatures_sha256)
            ).all()
        for sha, ns, name, version, path in rows:
            refs.setdefault(sha, []).append(f"{ns}/{name}@{version}:{path}")
        for ns, name, version, manifest_sha, sig_sha in heads:
            refs.setdefault(manifest_sha, []).append(f"{ns}/{name}@{version}:{MANIFEST_FILE}")
            if sig_sha:
                refs.setdefault(sig_sha, []).append(f"{ns}/{name}@{version}:{SIGNATURES_FILE}")
        return refs

    def integrity_ok(self) -> bool:
        return self.db.integrity_ok()

    # -- changes -------------------------------------------------------------------------------

    def set_yanked(self, ns: str, name: str, version: str, yanked: bool, reason: str) -> bool:
        """Flag or unflag a version; False if there is no such version."""
        with self.db.write() as con:
            self.db.notify(con, CHANGES_CHANNEL)
            done = con.execute(
                sa.update(versions)
                .where(_one_version(ns, name, version))
                .values(yanked=int(yanked), yank_reason=reason if yanked else "")
            )
            return done.rowcount > 0

    def package_exists(self, ns: str, name: str) -> bool:
        with self.db.read() as con:
            return (
                con.execute(sa.select(_p.name).where(_p.namespace == ns, _p.name == name)).first() is not None
            )

    def set_share(self, ns: str, name: str, grantee: str, shared: bool) -> bool:
        """Grant (or revoke) `grantee` read access to a package; False if the package does not exist."""
        with self.db.write() as con:
            self.db.notify(con, CHANGES_CHANNEL)
            if not con.execute(sa.select(_p.name).where(_p.namespace == ns, _p.name == name)).first():
                return False
            con.execute(
                sa.delete(shares).where(
                    shares.c.namespace == ns, shares.c.name == name, shares.c.grantee == grantee
                )
            )
            if shared:
                con.execute(sa.insert(shares).values(namespace=ns, name=name, grantee=grantee))
        return True

    def shared_with(self, ns: str, name: str) -> list[str]:
        with self.db.read() as con:
            q = sa.select(shares.c.grantee).where(shares.c.namespace == ns, shares.c.name == name)
            return list(con.execute(q.order_by(shares.c.grantee)).scalars())

    def set_public(self, ns: str, name: str, public: bool) -> bool:
        """Make a package public (or private); False if it does not exist."""
        with self.db.write() as con:
            self.db.notify(con, CHANGES_CHANNEL)
            done = con.execute(
                sa.update(packages).where(_p.namespace == ns, _p.name == name).values(public=int(public))
            )
            return done.rowcount > 0


def _upgrade_to_2(con: Connection) -> None:
    con.execute(sa.text("ALTER TABLE versions ADD COLUMN checked_bases TEXT NOT NULL DEFAULT ''"))


def _legacy_version(con: Connection) -> int:
    # Indexes made before `meta` existed never shipped; an index without it but with tables is v1.
    return 1 if sa.inspect(con).has_table("versions") else 0
