"""`adapterhub hub serve|token|tokens|revoke` and `adapterhub login`."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import print_json, run_cli

RegistryDir = Annotated[
    str | None,
    typer.Option("--registry", envvar="ADAPTERHUB_REGISTRY", help="registry directory the hub serves"),
]
TokensDbOpt = Annotated[
    str | None,
    typer.Option(
        "--tokens-db",
        envvar="ADAPTERHUB_HUB_TOKENS_DB",
        help="token store: a SQLite path or postgresql://USER@HOST/DB [default: STATE/tokens.sqlite]",
    ),
]
StateOpt = Annotated[
    str | None, typer.Option("--state", help="hub state folder (tokens, uploads) [default: REGISTRY/hub]")
]


def _location(registry: str | None) -> str:
    from adapterhub_lite.registry import default_location

    return str(registry or default_location())


def register(app: typer.Typer) -> None:
    hub_app = typer.Typer(help="The hub: the registry as an HTTP service with a web catalog.")
    app.add_typer(hub_app, name="hub")

    @hub_app.command("serve")
    @run_cli
    def serve(
        registry: RegistryDir = None,
        port: Annotated[int, typer.Option(help="TCP port (beside a server on 8000)")] = 8100,
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        state: StateOpt = None,
        tokens_db: TokensDbOpt = None,
        base: Annotated[
            list[str] | None,
            typer.Option(help="a base model this hub serves (repeatable): its publishes are shape-checked"),
        ] = None,
        max_upload: Annotated[int | None, typer.Option(help="largest accepted upload, bytes")] = None,
        public_url: Annotated[
            str, typer.Option(help="the hub's address as users reach it (https://... behind a TLS proxy)")
        ] = "",
        header_timeout: Annotated[
            float, typer.Option(help="seconds a connection has to send each request's headers")
        ] = 10.0,
        per_client: Annotated[
            int, typer.Option(help="most connections one client address may hold open at once")
        ] = 32,
    ) -> None:
        """Serve the registry over HTTP (API under /api/v1, web catalog at /, GET /health)."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.hub import Limits, exposure_warning
        from adapterhub_lite.hub import serve as run

        location = _location(registry)
        warning = exposure_warning(host)
        if warning:
            typer.secho(warning, err=True, fg=typer.colors.YELLOW)
        url = public_url or f"http://{host}:{port}"
        typer.echo(f"hub on http://{host}:{port} over {safe(location)}", err=True)
        typer.echo(
            f"next: make a publish token with `adapterhub hub token NAMESPACE --scope publish`, then "
            f"`adapterhub publish BUNDLE --registry {safe(url)}`; the catalog is at {safe(url)}/",
            err=True,
        )
        run(
            location,
            host=host,
            port=port,
            state_dir=state,
            tokens_db=tokens_db,
            bases=list(base or []),
            max_upload=max_upload,
            public_url=public_url,
            limits=Limits(header_timeout_s=header_timeout, per_client=per_client),
        )

    @hub_app.command("token")
    @run_cli
    def token(
        namespace: Annotated[str, typer.Argument(help="the namespace the token acts for")],
        scope: Annotated[str, typer.Option(help="read | publish | admin")] = "read",
        note: Annotated[str, typer.Option(help="what the token is for")] = "",
        registry: RegistryDir = None,
        state: StateOpt = None,
        tokens_db: TokensDbOpt = None,
    ) -> None:
        """Create a token; it is shown once (the last line of the output)."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.hub import token_store

        secret, info = token_store(_location(registry), state, tokens_db).create(namespace, scope, note)
        typer.echo(
            f"created {info.scope} token {info.id} for namespace {safe(info.namespace)}; "
            "it is shown once, store it now:"
        )
        typer.echo(secret)

    @hub_app.command("tokens")
    @run_cli
    def tokens(
        registry: RegistryDir = None,
        state: StateOpt = None,
        tokens_db: TokensDbOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """List tokens (ids, namespaces, scopes; never the tokens themselves)."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.hub import token_store

        rows = token_store(_location(registry), state, tokens_db).list()
        if as_json:
            print_json([t.to_dict() for t in rows])
            return
        if not rows:
            typer.echo("(no tokens)")
            return
        typer.echo(f"{'ID':<12}  {'NAMESPACE':<24} {'SCOPE':<8} {'CREATED':<20}  {'STATE':<8} NOTE")
        for t in rows:
            typer.echo(
                f"{t.id:<12}  {safe(t.namespace):<24} {t.scope:<8} {t.created:<20}  "
                f"{'REVOKED' if t.revoked else 'active':<8} {safe(t.note)}"
            )

    @hub_app.command("revoke")
    @run_cli
    def revoke(
        token_id: Annotated[str, typer.Argument(help="token id (from `hub tokens`) or the token")],
        registry: RegistryDir = None,
        state: StateOpt = None,
        tokens_db: TokensDbOpt = None,
    ) -> None:
        """Revoke a token: the next request with it is refused."""
        from adapterhub_lite.hub import token_store

        info = token_store(_location(registry), state, tokens_db).revoke(token_id)
        typer.echo(f"revoked token {info.id}")

    @app.command("login")
    @run_cli
    def login(
        token: Annotated[
            str, typer.Option(prompt=True, hide_input=True, envvar="ADAPTERHUB_TOKEN", help="the hub token")
        ],
        hub: Annotated[
            str | None,
            typer.Option(
                envvar="ADAPTERHUB_REGISTRY",
                help="the hub URL the token is for; it is checked there and sent to no other hub",
            ),
        ] = None,
    ) -> None:
        """Check a hub token against its hub and store it for that hub only (file mode 0600)."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.registry.remote import login as check_and_store

        namespace, scope, path = check_and_store(hub, token.strip())
        typer.echo(f"token for {safe(namespace)} ({scope}) at {safe(hub)} stored in {path}")
