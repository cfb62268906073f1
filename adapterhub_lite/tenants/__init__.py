"""The tenant store: tenants and their keys, aliases and their history, rollouts, and the usage ledger's
rows, in one database (SQLite by default, PostgreSQL in a cluster) beside the registry."""

from adapterhub_lite.tenants.store import Tenant, TenantStore

__all__ = ["Tenant", "TenantStore"]
