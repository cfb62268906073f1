"""`adapterhub publish`, `pull`, `search`, `show`, `list`, `yank`, `share` and `registry ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapterhub_lite.display import safe
from cli.common import print_json, run_cli

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="ADAPTERHUB_REGISTRY",
        help="registry: a directory, sqlite:///DIR, postgresql://..., or a hub URL http(s)://... "
        "[default: ~/.adapterhub/registry]",
    ),
]
BlobsOpt = Annotated[
    str | None,
    typer.Option(
        "--blobs", envvar="ADAPTERHUB_BLOBS", help="blob storage (fsspec URL) when creating a registry"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _open(registry: str | None, blobs: str | None = None):
    from adapterhub_lite.registry import open_registry

    return open_registry(registry, blobs=blobs)


def _table(rows) -> None:
    if not rows:
        typer.echo("(nothing found)")
        return
    for p in rows:
        marks = (("yanked", p.yanked), ("public", p.public), ("signed", p.signed))
        flags = " ".join(f for f, on in marks if on)
        typer.echo(
            f"{safe(p.ref):<40} rank {p.rank:<4} base {safe(p.base_name, 40):<20} {p.size:>12,} B  {flags}"
        )


def register(app: typer.Typer) -> None:
    @app.command("publish")
    @run_cli
    def publish(
        bundle: Annotated[
            Path, typer.Argument(help="a bundle directory or archive (from `adapterhub pack`)")
        ],
        registry: RegistryOpt = None,
        blobs: BlobsOpt = None,
        base: Annotated[
            Path | None,
            typer.Option(
                help="base model directory: shape-check the weights against it and record its fingerprint"
            ),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Publish a bundle; the version becomes immutable."""
        from adapterhub_lite.errors import ErrorKind, RegistryError
        from adapterhub_lite.registry import Registry

        reg = _open(registry, blobs)
        if base is None:
            p = reg.publish(bundle, progress=not as_json)
        elif not isinstance(reg, Registry):
            raise RegistryError(
                "--base applies to a local registry",
                hint="a hub checks bundles against the bases it was started with (`hub serve --base DIR`)",
                kind=ErrorKind.INVALID,
            )
        else:
            p = reg.publish(bundle, progress=not as_json, base_dir=base)
        if as_json:
            print_json(p.to_dict())
        else:
            unchecked = (
                "none (pass --base DIR to check the weights' shapes)"
                if isinstance(reg, Registry)
                else "none (the hub has no matching base; its operator adds one: `hub serve --base DIR`)"
            )
            checked = ", ".join(p.checked_bases) or unchecked
            typer.echo(f"published {p.ref}\n  digest {p.digest}\n  checked against base {checked}")

    @app.command("pull")
    @run_cli
    def pull(
        ref: Annotated[str, typer.Argument(help="namespace/name@version, or namespace/name for the newest")],
        dest: Annotated[
            Path | None,
            typer.Option("--dest", "-o", help="bundle directory to create; default ./NAME-VERSION"),
        ] = None,
        max_lora_rank: Annotated[int | None, typer.Option(help="refuse ranks above this limit")] = None,
        registry: RegistryOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Download a bundle into a directory and verify it."""
        reg = _open(registry)
        p = reg.resolve(ref)
        dest = dest or Path(f"{p.name}-{p.version}")
        path = reg.pull(p.ref, dest, max_lora_rank=max_lora_rank, vllm_check=False, progress=not as_json)
        if as_json:
            print_json({**p.to_dict(), "path": str(path)})
        else:
            typer.echo(f"pulled {p.ref} -> {path}" + ("  (yanked!)" if p.yanked else ""))

    @app.command("search")
    @run_cli
    def search(
        text: Annotated[str, typer.Argument(help="words in the name, namespace, description or tags")] = "",
        base: Annotated[str | None, typer.Option(help="only adapters for this base fingerprint")] = None,
        tag: Annotated[str | None, typer.Option(help="only adapters with this tag")] = None,
        registry: RegistryOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Search adapters (newest non-yanked version of each)."""
        rows = _open(registry).search(text, base=base, tag=tag)
        print_json([p.to_dict() for p in rows]) if as_json else _table(rows)

    @app.command("list")
    @run_cli
    def list_cmd(
        namespace: Annotated[str | None, typer.Argument(help="only this namespace")] = None,
        registry: RegistryOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """List every published version (yanked ones flagged)."""
        rows = _open(registry).versions(namespace)
        print_json([p.to_dict() for p in rows]) if as_json else _table(rows)

    @app.command("show")
    @run_cli
    def show(
        ref: Annotated[str, typer.Argument(help="namespace/name@version or namespace/name")],
        registry: RegistryOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Show one version: identity, base, adapter shape, training metrics, sharing."""
        reg = _open(registry)
        p = reg.resolve(ref)
        m = reg.manifest(p.ref)
        data = {
            **p.to_dict(),
            "shared_with": reg.shared_with(p.ref),
            "adapter": m.adapter.model_dump(),
            "files": [f.model_dump() for f in m.files],
            "training": m.training,
        }
        if as_json:
            print_json(data)
            return
        typer.echo(
            f"{p.ref}{'  (yanked: ' + safe(p.yank_reason or 'no reason given') + ')' if p.yanked else ''}"
        )
        typer.echo(f"  digest      {p.digest}")
        typer.echo(f"  base        {safe(p.base_name)} ({safe(p.base_fingerprint)})")
        typer.echo(f"  checked     {safe(', '.join(p.checked_bases)) or 'against no base at publish'}")
        a = m.adapter
        typer.echo(
            f"  adapter     rank {a.rank}, alpha {a.alpha:g}, {safe(', '.join(a.target_modules))}, "
            f"{a.parameter_count:,} parameters"
        )
        typer.echo(
            f"  license     {safe(p.license)}\n  published   {safe(p.published_at)}\n  signed      {p.signed}"
        )
        typer.echo(
            f"  visibility  {'public' if p.public else 'private'}; shared with "
            f"{safe(', '.join(data['shared_with'])) or 'nobody'}"
        )
        metrics = (m.training or {}).get("metrics")
        if isinstance(metrics, dict):
            typer.echo(f"  metrics     {safe(metrics)}")

    @app.command("yank")
    @run_cli
    def yank(
        ref: Annotated[str, typer.Argument(help="namespace/name@version")],
        reason: Annotated[str, typer.Option(help="why (shown by `show`)")] = "",
        undo: Annotated[bool, typer.Option("--undo", help="un-yank")] = False,
        registry: RegistryOpt = None,
    ) -> None:
        """Yank a version: `namespace/name` no longer resolves to it (it stays pullable by exact version)."""
        p = _open(registry).yank(ref, reason=reason, undo=undo)
        typer.echo(f"{'un-yanked' if undo else 'yanked'} {p.ref}")

    @app.command("share")
    @run_cli
    def share(
        ref: Annotated[str, typer.Argument(help="namespace/name (sharing covers every version)")],
        with_namespace: Annotated[str | None, typer.Option("--with", help="namespace to share with")] = None,
        revoke: Annotated[bool, typer.Option("--revoke", help="withdraw the share instead")] = False,
        public: Annotated[
            bool | None, typer.Option("--public/--private", help="readable by everyone")
        ] = None,
        registry: RegistryOpt = None,
    ) -> None:
        """Share an adapter with another namespace, or make it public/private."""
        from adapterhub_lite.errors import ErrorKind, RegistryError

        if with_namespace is None and public is None:
            raise RegistryError(
                "nothing to do", hint="pass --with NAMESPACE, --public or --private", kind=ErrorKind.INVALID
            )
        reg = _open(registry)
        if with_namespace:
            reg.share(ref, with_namespace, revoke=revoke)
            typer.echo(
                f"{'revoked' if revoke else 'shared'} {ref} {'from' if revoke else 'with'} {with_namespace}"
            )
        if public is not None:
            reg.set_public(ref, public)
            typer.echo(f"{ref} is now {'public' if public else 'private'}")

    reg_app = typer.Typer(help="Registry maintenance.")
    app.add_typer(reg_app, name="registry")

    @reg_app.command("check")
    @run_cli
    def check(
        repair: Annotated[
            bool, typer.Option("--repair", help="remove orphaned blobs and stale temp files")
        ] = False,
        grace: Annotated[
            float, typer.Option(help="spare files younger than this many seconds (a publish may be running)")
        ] = 3600.0,
        deep: Annotated[bool, typer.Option("--deep", help="also re-hash every blob")] = False,
        registry: RegistryOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Find orphaned, missing and corrupt blobs (and repair what can be repaired)."""
        report = _open(registry).check(repair=repair, grace_s=grace, deep=deep)
        if as_json:
            print_json(report.to_dict())
        else:
            typer.echo(f"index integrity: {'ok' if report.index_ok else 'FAILED'}")
            for label, items in (
                ("orphaned blobs", report.orphaned_blobs),
                ("stale temp files", report.stale_temp_files),
                ("corrupt blobs", report.corrupt_blobs),
                ("removed", report.removed),
                ("kept (younger than --grace)", report.kept_recent),
            ):
                typer.echo(f"{label}: {len(items)}")
                for item in items:
                    typer.echo(f"  {safe(item)}")
            typer.echo(f"missing blobs: {len(report.missing_blobs)}")
            for kid in report.unscoped_keys:
                typer.echo(
                    f"warning: key {kid} is trusted for every namespace; scope it with "
                    "`adapterhub registry trust KEY --namespace NS`"
                )
            for item in report.missing_blobs:
                typer.echo(
                    f"  {safe(item['file'])} ({item['blob']}): publish that bundle again to restore it"
                )
        if not report.ok and not (repair and report.repaired):
            raise typer.Exit(code=1)

    @reg_app.command("trust")
    @run_cli
    def trust(
        key: Annotated[str, typer.Argument(help="public key: 64 hex, a .pub file, or a key name")],
        namespace: Annotated[
            list[str] | None,
            typer.Option(
                "--namespace",
                help="trust it only for bundles of this namespace (repeatable; this or --all-namespaces)",
            ),
        ] = None,
        all_namespaces: Annotated[
            bool,
            typer.Option(
                "--all-namespaces", help="trust it for EVERY namespace (its holder may publish as anyone)"
            ),
        ] = False,
        registry: RegistryOpt = None,
    ) -> None:
        """Trust a public key: from now on this registry only accepts bundles signed by a trusted key.

        Running it again for the same key replaces the namespaces it is trusted for."""
        from adapterhub_lite.registry.trust import trust_scope

        scope = trust_scope(namespace, all_namespaces)
        kid = _open(registry).trust(key, scope)
        if scope is None:
            typer.echo(f"WARNING: {kid} is trusted for EVERY namespace: it may sign as any team", err=True)
        typer.echo(f"trusted {kid} for " + (", ".join(sorted(set(scope))) if scope else "every namespace"))
