"""Who is calling and what they may do.

Anonymous callers read public adapters only. A `read` token reads its namespace's adapters, those shared
with its namespace and public ones; `publish` adds publishing, yanking and sharing under its own
namespace; `admin` is the operator's token: it reads and changes everything. An adapter a caller may not
read does not exist for that caller: every refusal about it is the same NOT_FOUND a missing one gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from adapterhub_lite.errors import ErrorKind
from adapterhub_lite.hub.tokens import HubError, TokenInfo
from adapterhub_lite.registry.records import Published, newest, ref_of


@dataclass(frozen=True)
class Caller:
    """The authenticated side of a request (`token is None`: anonymous)."""

    token: TokenInfo | None = None

    @property
    def namespace(self) -> str | None:
        return self.token.namespace if self.token else None

    @property
    def admin(self) -> bool:
        return bool(self.token and self.token.scope == "admin")

    def lookup(self, registry: Any, ref: str) -> Published | None:
        """The version `ref` names when this caller may read it, else None (`ref` already parsed).

        The same two statements run whether the adapter is missing, private or readable, so how long a
        refusal takes does not say which it was: the package's versions, and who it is shared with.
        """
        r = ref_of(ref)
        rows = registry.index.versions_of(r.namespace, r.name)
        grantees = registry.index.shared_with(r.namespace, r.name)
        if not self._may_read(r.namespace, rows, grantees):
            return None
        if r.version is not None:
            return next((p for p in rows if p.version == r.version), None)
        return newest(p for p in rows if not p.yanked)

    def _may_read(self, namespace: str, rows: list, grantees: list[str]) -> bool:
        public = any(p.public for p in rows)  # a package's flag: every row carries the same
        if not rows:
            return False
        if self.admin or public:
            return True
        return self.namespace is not None and (self.namespace == namespace or self.namespace in grantees)

    def can_read(self, registry: Any, ref: str) -> bool:
        """Whether this caller may see the package of `ref`, and the version if `ref` names one."""
        r = ref_of(ref)
        if r.version is not None:
            return self.lookup(registry, ref) is not None
        rows = registry.index.versions_of(r.namespace, r.name)
        return self._may_read(r.namespace, rows, registry.index.shared_with(r.namespace, r.name))

    def require_write(self, registry: Any, namespace: str, ref: str | None = None) -> None:
        """Publish, yank or share under `namespace`; a ref the caller cannot read stays a 404."""
        if ref is not None and not self.can_read(registry, ref):
            raise not_found(ref)
        if self.token is None:
            raise HubError(
                "this needs a token",
                hint="pass a publish token (ADAPTERHUB_TOKEN or `adapterhub login`)",
                kind=ErrorKind.UNAUTHENTICATED,
            )
        if self.admin:
            return
        if self.token.scope != "publish":
            raise HubError(
                f"a {self.token.scope} token cannot change anything",
                hint="use a publish token of the namespace",
                kind=ErrorKind.FORBIDDEN,
            )
        if namespace != self.namespace:
            raise HubError(
                f"a token of namespace {self.namespace!r} cannot change {namespace!r}",
                hint=f"use a publish token of {namespace!r}",
                kind=ErrorKind.FORBIDDEN,
            )

    def require_own(self, namespace: str) -> None:
        """Questions about what a namespace may read are for that namespace's tokens (or an admin's):
        anyone else would learn who an adapter is shared with."""
        if self.admin or namespace == self.namespace:
            return
        if self.token is None:
            raise HubError(
                "this needs a token of the namespace asked about",
                hint="pass a token (ADAPTERHUB_TOKEN or `adapterhub login`)",
                kind=ErrorKind.UNAUTHENTICATED,
            )
        raise HubError(
            f"a token of namespace {self.namespace!r} can ask only about {self.namespace!r}",
            hint="ask with a token of that namespace, or an admin token",
            kind=ErrorKind.FORBIDDEN,
        )

    def visible(self, registry: Any, rows: list) -> list:
        """The rows (Published) this caller may see; one statement whatever the number of rows."""
        if self.admin:
            return rows
        if self.namespace is None:
            return [p for p in rows if p.public]
        ns, shared = self.namespace, shared_to(registry, self.namespace)
        return [p for p in rows if p.namespace == ns or p.public or (p.namespace, p.name) in shared]


def shared_to(registry: Any, grantee: str) -> set[tuple[str, str]]:
    """(namespace, name) of every package shared with `grantee`, in one statement."""
    from adapterhub_lite.registry.index import shares

    q = sa.select(shares.c.namespace, shares.c.name).where(shares.c.grantee == grantee)
    with registry.index.db.read() as con:
        return {(ns, name) for ns, name in con.execute(q)}


def not_found(ref: str) -> HubError:
    """The one answer for "missing" and "not yours": same message, same status."""
    return HubError(
        f"no {ref} on this hub",
        hint="check the name, and that your token may read it",
        kind=ErrorKind.NOT_FOUND,
    )
