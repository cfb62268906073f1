"""Tenants and aliases as a request needs them: in memory, re-read only when the store has changed.

The store's change probe (`data_version`) costs microseconds, so every request asks it, and only a
change (a promote, a new key, a revoke anywhere) re-reads the aliases and forgets the tenants found by
key. Used by every server process that resolves requests: the tenancy middleware and the cluster's
ingress, so both see a promote at the same moment and resolve it the same way.
"""

from __future__ import annotations

from adapterhub_lite.tenants.store import Tenant, TenantStore, hash_key

_MAX_TENANTS = 10_000


class TenantCache:
    """Tenants by key hash and every tenant's aliases, for one store."""

    def __init__(self, store: TenantStore) -> None:
        self.store = store
        self.version = -1
        self._by_hash: dict[str, Tenant] = {}
        self._aliases: dict[str, dict[str, str]] = {}

    def refresh(self, force: bool = False) -> int:
        """Re-read if the store changed (always with `force`); returns the store's version."""
        version = self.store.data_version()
        if force or version != self.version:
            self._by_hash.clear()
            self._aliases = self.store.all_aliases()
            self.version = version
        return self.version

    def cached(self, key: str) -> Tenant | None:
        """The tenant holding `key` if it is in memory (no database call); None otherwise."""
        return self._by_hash.get(hash_key(key))

    def tenant(self, key: str) -> Tenant | None:
        """The active tenant holding `key`, or None (a database call when it is not in memory)."""
        digest = hash_key(key)
        tenant = self._by_hash.get(digest)
        if tenant is None:
            tenant = self.store.authenticate(key)
            if tenant is not None:  # unknown keys are not remembered: random keys must not grow memory
                if len(self._by_hash) >= _MAX_TENANTS:
                    self._by_hash.clear()
                self._by_hash[digest] = tenant
        return tenant

    def all_aliases(self) -> dict[str, dict[str, str]]:
        """Every tenant's aliases (tenant -> alias -> full reference) as of the last refresh."""
        return self._aliases

    def aliases(self, tenant: str) -> dict[str, str]:
        """The tenant's aliases (alias -> full reference) as of the last refresh."""
        return self._aliases.get(tenant, {})
