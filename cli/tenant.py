"""`adapterhub tenant ...`: tenants, their keys, aliases (hot swap) and access, in the tenant store.

These commands write the store directly; a running server sees each change on its next request.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import print_json, run_cli
from cli.rollout import register_rollout

DbOpt = Annotated[str | None, typer.Option("--db", help="tenant store (else $ADAPTERHUB_TENANTS_DB)")]
RegOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="ADAPTERHUB_REGISTRY",
        help="registry: a directory, a database URL or a hub URL, as `serve --registry` "
        "[default: ~/.adapterhub/registry]",
    ),
]
# Said when a reference is missing from the default registry: the server may read another one.
_ONE_REGISTRY = (
    "is the server reading another registry (`serve --registry URL`)? Set ADAPTERHUB_REGISTRY=URL "
    "once, for `serve` and every command, or pass --registry URL here too"
)


def _store(db: str | None):
    from adapterhub_lite.tenants.store import TenantStore

    return TenantStore.open(db)


def _registry(location: str | None):
    from adapterhub_lite.registry import open_registry

    return open_registry(location)


def register(app: typer.Typer) -> None:
    tenant_app = typer.Typer(help="Manage tenants: keys, aliases (hot swap), base access, rate limits.")
    app.add_typer(tenant_app, name="tenant")

    @tenant_app.command("add")
    @run_cli
    def add(
        name: str,
        namespace: Annotated[str | None, typer.Option(help="registry namespace (default: the name)")] = None,
        base_access: Annotated[bool, typer.Option("--base-access", help="may call the base model")] = False,
        rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
        tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
        db: DbOpt = None,
    ) -> None:
        """Create a tenant and print its API key (shown this once; only its hash is stored)."""
        tenant, key = _store(db).add_tenant(
            name, namespace=namespace, base_access=base_access, requests_per_minute=rpm, tokens_per_minute=tpm
        )
        typer.echo(f"tenant {tenant.name} (namespace {tenant.namespace}) created. API key, shown once:")
        typer.echo(key)

    @tenant_app.command("rotate-key")
    @run_cli
    def rotate_key(name: str, db: DbOpt = None) -> None:
        """Give a tenant a new key (the old one stops working now) and print it once."""
        typer.echo(_store(db).rotate_key(name))

    @tenant_app.command("revoke")
    @run_cli
    def revoke(name: str, db: DbOpt = None) -> None:
        """Disable a tenant's key at once (`rotate-key` re-enables it with a new key)."""
        _store(db).revoke(name)
        typer.echo(f"tenant {name}: key revoked")

    @tenant_app.command("list")
    @run_cli
    def list_(db: DbOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List tenants with their aliases and limits (never their keys)."""
        store = _store(db)
        aliases = store.all_aliases()
        rows = [
            {
                "name": t.name,
                "namespace": t.namespace,
                "key": t.key_hint,
                "revoked": t.revoked,
                "base_access": t.base_access,
                "rpm": t.requests_per_minute,
                "tpm": t.tokens_per_minute,
                "aliases": aliases.get(t.name, {}),
            }
            for t in store.list_tenants()
        ]
        if as_json:
            print_json(rows)
            return
        for r in rows:
            state = "REVOKED" if r["revoked"] else "active"
            typer.echo(
                f"{r['name']:<16} ns={r['namespace']:<12} key={r['key']:<12} {state:<7} "
                f"base={'yes' if r['base_access'] else 'no'} rpm={r['rpm'] or '-'} tpm={r['tpm'] or '-'}"
            )
            for alias, ref in sorted(r["aliases"].items()):
                typer.echo(f"    {alias} -> {ref}")

    @tenant_app.command("promote")
    @run_cli
    def promote_cmd(tenant: str, alias: str, ref: str, db: DbOpt = None, registry: RegOpt = None) -> None:
        """Point ALIAS at REF live (hot swap); rolling back is promoting the previous version again."""
        from adapterhub_lite.errors import ErrorKind, RegistryError
        from adapterhub_lite.tenants.view import promote

        try:
            full, previous = promote(_store(db), _registry(registry), tenant, alias, ref)
        except RegistryError as exc:
            if exc.kind is not ErrorKind.NOT_FOUND or registry:
                raise
            raise RegistryError(exc.message, hint=_ONE_REGISTRY, kind=exc.kind) from None
        typer.echo(f"{tenant}: {alias} -> {full}" + (f" (was {previous})" if previous else ""))

    # `alias` is the same command under the name people look for when they create one.
    tenant_app.command("alias", help="Create or move an alias (the same command as `promote`).")(promote_cmd)

    @tenant_app.command("unalias")
    @run_cli
    def unalias(tenant: str, alias: str, db: DbOpt = None) -> None:
        """Remove an alias."""
        _store(db).remove_alias(tenant, alias)
        typer.echo(f"{tenant}: alias {alias} removed")

    @tenant_app.command("grant-base")
    @run_cli
    def grant_base(
        tenant: str,
        revoke_: Annotated[bool, typer.Option("--revoke", help="take base access away")] = False,
        db: DbOpt = None,
    ) -> None:
        """Allow a tenant to call the base model itself (or, with --revoke, forbid it)."""
        _store(db).set_base_access(tenant, not revoke_)
        typer.echo(f"{tenant}: base access {'revoked' if revoke_ else 'granted'}")

    @tenant_app.command("limits")
    @run_cli
    def limits(
        tenant: str,
        rpm: Annotated[int | None, typer.Option(help="requests per minute (omit: unlimited)")] = None,
        tpm: Annotated[int | None, typer.Option(help="tokens per minute (omit: unlimited)")] = None,
        db: DbOpt = None,
    ) -> None:
        """Set a tenant's rate limits."""
        _store(db).set_limits(tenant, rpm, tpm)
        typer.echo(f"{tenant}: rpm={rpm or 'unlimited'} tpm={tpm or 'unlimited'}")

    @tenant_app.command("grant")
    @run_cli
    def grant(ref: str, tenant: str, db: DbOpt = None, registry: RegOpt = None) -> None:
        """Share adapter REF with TENANT's namespace in the registry (so it may alias and call it)."""
        t = _store(db).get(tenant)
        _registry(registry).share(ref, t.namespace)
        typer.echo(f"{ref} shared with namespace {t.namespace} (tenant {tenant})")

    # `tenant rollout ...` and `tenant history` (the audit trail, alias moves included): cli/rollout.py
    register_rollout(tenant_app)
