"""Who is calling and what they may do.

Anonymous callers read public adapters only. A `read` token reads its namespace's adapters, those shared
with its namespace and public ones; `publish` adds publishing, yanking and sharing under its own
namespace; `admin` is the operator's token: it reads and changes everything. An adapter a caller may not
read does not exist for that caller: every refusal about it is the same NOT_FOUND a missing one gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.hub.tokens import HubError, TokenInfo


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

    def can_read(self, registry: Any, ref: str) -> bool:
        """Whether this caller may see `ref` (unknown refs: False)."""
        if self.admin:
            return _exists(registry, ref)
        if self.namespace:
            return bool(registry.can_read(self.namespace, ref))
        return _public(registry, ref)  # anonymous: public only

    def require_read(self, registry: Any, ref: str) -> None:
        if not self.can_read(registry, ref):
            raise not_found(ref)

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

    def visible(self, registry: Any, rows: list) -> list:
        """The rows (Published) this caller may see."""
        if self.admin:
            return rows
        if self.namespace is None:
            return [p for p in rows if p.public]
        ns = self.namespace
        return [p for p in rows if p.namespace == ns or p.public or registry.can_read(ns, p.ref)]


def _resolve(registry: Any, ref: str) -> Any:
    """The version `ref` names, or None when there is none (an unreachable registry still raises)."""
    try:
        return registry.resolve(ref)
    except AdapterHubError as exc:
        if exc.kind in (ErrorKind.NOT_FOUND, ErrorKind.INVALID):
            return None
        raise


def _exists(registry: Any, ref: str) -> bool:
    return _resolve(registry, ref) is not None


def _public(registry: Any, ref: str) -> bool:
    p = _resolve(registry, ref)
    return bool(p is not None and p.public)


def not_found(ref: str) -> HubError:
    """The one answer for "missing" and "not yours": same message, same status."""
    return HubError(
        f"no {ref} on this hub",
        hint="check the name, and that your token may read it",
        kind=ErrorKind.NOT_FOUND,
    )
