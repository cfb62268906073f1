"""A tenant's view: which `model` names it may use, and the immutable reference each one means.

In order: the tenant's own aliases; the served base model, if the tenant has base access; a
reference `namespace/name@version` (or `namespace/name` = newest) that the registry lets the tenant's
namespace read (its own, shared with it, or public). Anything else is "does not exist", whether or not
it exists for someone else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from adapterhub_lite.errors import AdapterHubError, ErrorKind, ServingError
from adapterhub_lite.registry.contract import RegistryAPI
from adapterhub_lite.tenants.store import Tenant, TenantStore, is_full_ref

_TTL_SECONDS = 5.0  # how long a registry answer (can_read, newest version) is reused
_MAX_MEMO = 10_000
# Registry answers that mean "not for this tenant". Any other failure (a database that is down, a hub
# that does not answer) is raised, never remembered: the client gets 503 and retries, not a 404 that
# would be reused for `_TTL_SECONDS` after the registry came back.
_ANSWERS = (ErrorKind.NOT_FOUND, ErrorKind.INVALID, ErrorKind.FORBIDDEN)


def _an_answer(err: AdapterHubError) -> bool:
    return err.kind in _ANSWERS


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolves to, and whether adapterhub manages it.

    `managed` is True for a registry adapter (by full reference): it is verified before vLLM loads
    it and counts in the hot set. False for the base model and for adapters the admin loaded under a
    name of their own: those pass through to vLLM as they are.
    """

    name: str  # the name vLLM sees
    managed: bool


class CachedRegistry:
    """Registry answers (newest version, may-read, readable list) reused for a few seconds, so a busy
    server asks the registry a few times a minute; a share withdrawn is seen within `_TTL_SECONDS`.
    A registry that cannot answer raises its error (UNAVAILABLE, INTERNAL): nothing is remembered."""

    def __init__(self, registry: RegistryAPI) -> None:
        # A zero-argument callable is called on first use, so a server that only serves the base model
        # never opens the registry.
        self._registry = registry
        self._memo: dict[tuple, tuple[float, Any]] = {}

    @property
    def registry(self) -> Any:
        if callable(self._registry) and not hasattr(self._registry, "resolve"):
            self._registry = self._registry()
        return self._registry

    def _cached(self, key: tuple, fn: Any) -> Any:
        now = time.monotonic()
        hit = self._memo.get(key)
        if hit and now - hit[0] < _TTL_SECONDS:
            return hit[1]
        value = fn()
        if len(self._memo) >= _MAX_MEMO:  # model names come from clients: keep this bounded
            self._memo.clear()
        self._memo[key] = (now, value)
        return value

    def full_ref(self, ref: str) -> str | None:
        """`ref` pinned to a version (None if the registry does not know it or it is yanked)."""
        if is_full_ref(ref):
            return ref

        def newest() -> str | None:
            try:
                return self.registry.resolve(ref).ref
            except AdapterHubError as e:
                if not _an_answer(e):
                    raise
                return None

        return self._cached(("resolve", ref), newest)

    def can_read(self, namespace: str, ref: str) -> bool:
        def ask() -> bool:
            try:
                return bool(self.registry.can_read(namespace, ref))
            except AdapterHubError as e:
                if not _an_answer(e):
                    raise
                return False

        return self._cached(("can_read", namespace, ref), ask)

    def readable(self, namespace: str, base: str | None) -> list[tuple[str, str]]:
        """(`namespace/name`, newest full ref) of each adapter `namespace` may use ([] if unreadable)."""

        def ask() -> list[tuple[str, str]]:
            try:
                return [(f"{p.namespace}/{p.name}", p.ref) for p in self.registry.readable(namespace, base)]
            except AdapterHubError as e:
                if not _an_answer(e):
                    raise
                return []

        return self._cached(("readable", namespace, base), ask)

    def clear(self) -> None:
        self._memo.clear()


def resolve_model(
    model: str, tenant: Tenant, aliases: dict[str, str], base_names: set[str], registry: CachedRegistry | None
) -> Target | None:
    """The target of `model` in `tenant`'s view, or None if the tenant may not use it."""
    ref = aliases.get(model)
    if ref is not None:
        # Another namespace's adapter is re-checked (a share can be withdrawn: fail closed); the tenant's
        # own immutable versions need no registry round trip on the hot path.
        own = ref.startswith(tenant.namespace + "/")
        if not own and registry is not None and not registry.can_read(tenant.namespace, ref):
            return None
        return Target(ref, True)
    if model in base_names:
        return Target(model, False) if tenant.base_access else None
    if "/" in model and registry is not None:
        full = registry.full_ref(model)
        if full and registry.can_read(tenant.namespace, full):
            return Target(full, True)
    return None


def promote(
    store: TenantStore, registry: RegistryAPI, tenant: str, alias: str, ref: str
) -> tuple[str, str | None]:
    """Point a tenant's alias at `ref` (pinned to its newest version if none is given): the hot swap.

    Checks that the registry knows `ref` and lets the tenant read it. Returns (new full ref, previous
    ref or None). Rolling back is promoting the previous reference again.
    """
    full = usable_ref(store, registry, tenant, ref, "promoted")
    previous = store.set_alias(tenant, alias, full)
    return full, previous


def usable_ref(store: TenantStore, registry: RegistryAPI, tenant: str, ref: str, what: str) -> str:
    """The full reference of `ref` if the registry knows it, it is not yanked and `tenant` may read it:
    what a promote and a rollout's candidate both need. `what` says what is refused ("promoted")."""
    t = store.get(tenant)
    published = registry.resolve(ref)
    full = published.ref
    if getattr(published, "yanked", False):
        raise ServingError(
            f"{full} is yanked and cannot be {what}", hint="pick another version", kind=ErrorKind.INVALID
        )
    if not registry.can_read(t.namespace, full):
        raise ServingError(
            f"tenant {tenant!r} (namespace {t.namespace!r}) may not use {full}",
            hint=f"share it first: `adapterhub share {full} {t.namespace}`, or make it public",
            kind=ErrorKind.FORBIDDEN,
        )
    return full
