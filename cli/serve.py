"""`adapterhub serve`: launch vLLM's OpenAI server with the adapterhub plugin and tenancy."""

from __future__ import annotations

import shlex
import signal
import time
from typing import Annotated

import typer

from cli.common import run_cli


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @run_cli
    def serve(
        base: Annotated[
            str | None, typer.Option(help="base model directory; default: the embedded base")
        ] = None,
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
        max_loras: Annotated[int, typer.Option(help="distinct adapters in one batch")] = 4,
        max_lora_rank: Annotated[int, typer.Option(help="largest adapter rank served")] = 16,
        max_cpu_loras: Annotated[int, typer.Option(help="adapters vLLM keeps in memory")] = 8,
        max_loaded: Annotated[
            int | None, typer.Option(help="hot set: adapters kept loaded (default: --max-cpu-loras)")
        ] = None,
        idle_seconds: Annotated[int, typer.Option(help="unload an adapter unused this long")] = 600,
        max_model_len: Annotated[int, typer.Option(help="context length")] = 512,
        registry: Annotated[
            str | None, typer.Option(help="registry location (else $ADAPTERHUB_REGISTRY)")
        ] = None,
        tenants_db: Annotated[
            str | None, typer.Option(help="tenant store (else $ADAPTERHUB_TENANTS_DB)")
        ] = None,
        admin_key: Annotated[
            str | None,
            typer.Option(
                envvar="ADAPTERHUB_ADMIN_KEY", help="admin key; a random one is made and printed if unset"
            ),
        ] = None,
        cache_dir: Annotated[str | None, typer.Option(help="verified-bundle cache directory")] = None,
        cache_max_mb: Annotated[int, typer.Option(help="bound of the bundle cache on disk")] = 2048,
        trusted_key: Annotated[
            list[str] | None, typer.Option(help="public key file; when given, bundles must be signed by one")
        ] = None,
        print_command: Annotated[
            bool, typer.Option("--print-command", help="print the env and vLLM command line, do not start")
        ] = False,
    ) -> None:
        """Serve the base model and every tenant's adapters, from one vLLM server (Ctrl-C stops)."""
        from adapterhub_lite.serving.launcher import ServeOptions, VLLMServer, build_command

        opts = ServeOptions(
            base_dir=base or "embedded",
            host=host,
            port=port,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            max_loaded=max_loaded,
            idle_seconds=idle_seconds,
            max_model_len=max_model_len,
            registry=registry,
            tenants_db=tenants_db,
            admin_key=admin_key,
            cache_dir=cache_dir,
            cache_max_mb=cache_max_mb,
            trusted_keys=list(trusted_key or []),
        )
        if print_command:
            cmd, env = build_command(opts)
            env.setdefault("ADAPTERHUB_ADMIN_KEY", "<choose-a-long-random-secret>")
            typer.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " \\")
            typer.echo("  " + shlex.join(cmd))
            return
        server = VLLMServer(opts)
        typer.echo(f"starting vLLM on {server.url} (log: {server.log_path}) ...")
        with server:
            typer.echo(f"serving on {server.url}/v1  (OpenAI API; tenants use their own keys)")
            if not admin_key:
                typer.echo(f"admin key (shown once): {server.admin_key}")
            stop = []
            signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
            try:
                while not stop and server.process is not None and server.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                typer.echo("stopping ...")
            code = server.process.poll() if server.process is not None else None
        if code not in (None, 0):
            typer.secho(
                f"vLLM exited with code {code}; log: {server.log_path}", err=True, fg=typer.colors.RED
            )
            raise typer.Exit(code=1)
