"""`adapterhub serve`: launch vLLM's OpenAI server with the adapterhub plugin and tenancy."""

from __future__ import annotations

from typing import Annotated

import typer

from adapterhub_lite.serving.config import (
    ENV_ADMIN_KEY,
    ENV_OTLP_ENDPOINT,
    ENV_OTLP_SAMPLE_RATIO,
    ENV_RATE_LIMIT_URL,
    ServingConfig,
)
from adapterhub_lite.serving.supervisor.launcher import ServeOptions
from cli.common import DEFAULT_RATE_LIMIT_FAILURE, RateLimitFailure, run_cli

# Defaults live in ServeOptions / ServingConfig; the flags only read them.
_D = ServeOptions
_C = ServingConfig


def register(app: typer.Typer) -> None:
    @app.command("serve")
    @run_cli
    def serve(
        base: Annotated[
            str | None, typer.Option(help="base model directory; default: the embedded base")
        ] = None,
        host: Annotated[str, typer.Option(help="address to listen on")] = _D.host,
        port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
        max_loras: Annotated[
            int | None, typer.Option(help="distinct adapters in one batch (default: 32 on CPU, 4 on GPU)")
        ] = None,
        max_lora_rank: Annotated[int, typer.Option(help="largest adapter rank served")] = _D.max_lora_rank,
        max_cpu_loras: Annotated[
            int | None, typer.Option(help="adapters vLLM keeps in memory (default: 64 on CPU, 8 on GPU)")
        ] = None,
        max_loaded: Annotated[
            int | None, typer.Option(help="hot set: adapters kept loaded (default: --max-cpu-loras)")
        ] = _C.max_loaded,
        idle_seconds: Annotated[
            int, typer.Option(help="unload an adapter unused this long")
        ] = _C.idle_seconds,
        max_model_len: Annotated[int, typer.Option(help="context length")] = _D.max_model_len,
        registry: Annotated[
            str | None, typer.Option(help="registry location (else $ADAPTERHUB_REGISTRY)")
        ] = None,
        tenants_db: Annotated[
            str | None, typer.Option(help="tenant store (else $ADAPTERHUB_TENANTS_DB)")
        ] = None,
        admin_key: Annotated[
            str | None,
            typer.Option(envvar=ENV_ADMIN_KEY, help="admin key; a random one is made and printed if unset"),
        ] = None,
        cache_dir: Annotated[str | None, typer.Option(help="verified-bundle cache directory")] = None,
        cache_max_mb: Annotated[
            int, typer.Option(help="bound of the bundle cache on disk")
        ] = _C.cache_max_mb,
        trusted_key: Annotated[
            list[str] | None, typer.Option(help="public key file; when given, bundles must be signed by one")
        ] = None,
        rate_limit_url: Annotated[
            str | None,
            typer.Option(
                envvar=ENV_RATE_LIMIT_URL,
                help="redis://HOST:PORT/DB: per-tenant limits shared by every replica (default: in-process)",
            ),
        ] = None,
        rate_limit_failure: Annotated[
            RateLimitFailure,
            typer.Option(
                envvar="ADAPTERHUB_RATE_LIMIT_FAILURE",
                help="while Redis is unreachable: 'open' admits, 'closed' answers 503",
            ),
        ] = DEFAULT_RATE_LIMIT_FAILURE,
        otlp_endpoint: Annotated[
            str | None,
            typer.Option(
                envvar=ENV_OTLP_ENDPOINT,
                help="OTLP/HTTP collector (http://HOST:4318): request traces, vLLM's too (default: off)",
            ),
        ] = None,
        otlp_sample_ratio: Annotated[
            float,
            typer.Option(
                envvar=ENV_OTLP_SAMPLE_RATIO, min=0.0, max=1.0, help="share of new traces recorded"
            ),
        ] = _C.otlp_sample_ratio,
        log: Annotated[
            str | None, typer.Option(help="vLLM's log file (default: ~/.adapterhub/logs/vllm-PORT.log)")
        ] = None,
        print_command: Annotated[
            bool, typer.Option("--print-command", help="print the env and vLLM command line, do not start")
        ] = False,
        verbose: Annotated[bool, typer.Option("--verbose", help="show vLLM's own output too")] = False,
    ) -> None:
        """Serve the base model and every tenant's adapters, from one vLLM server (Ctrl-C stops)."""
        from adapterhub_lite.serving.supervisor.launcher import VLLMServer
        from adapterhub_lite.serving.supervisor.supervise import describe_phases, run_until_stopped

        config = ServingConfig(
            admin_key=admin_key,
            tenants_db=tenants_db,
            registry=registry,
            base_dir=base or "embedded",
            cache_max_mb=cache_max_mb,
            max_loaded=max_loaded,
            idle_seconds=idle_seconds,
            trusted_keys=list(trusted_key or []),
            rate_limit_url=rate_limit_url,
            rate_limit_failure=rate_limit_failure.value,
            otlp_endpoint=otlp_endpoint,
            otlp_sample_ratio=otlp_sample_ratio,
        )
        if cache_dir:
            config.cache_dir = cache_dir
        opts = ServeOptions(
            config=config,
            host=host,
            port=port,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            max_model_len=max_model_len,
            log_path=log,
            verbose=verbose,
        )
        if print_command:
            from adapterhub_lite.serving.supervisor.launcher import printable_command

            for line in printable_command(opts):
                typer.echo(line)
            return
        server = VLLMServer(opts)
        typer.echo(f"starting vLLM on {server.url} (log: {server.log_path}) ...")

        def ready() -> None:
            typer.echo(describe_phases(server.phases))
            typer.echo(f"serving on {server.url}/v1  (OpenAI API; tenants use their own keys)")
            if not admin_key:
                typer.echo(f"admin key (shown once): {server.admin_key}")

        code = run_until_stopped(server, typer.echo, on_ready=ready)
        if code is not None:
            typer.secho(
                f"vLLM exited with code {code}; log: {server.log_path}", err=True, fg=typer.colors.RED
            )
            raise typer.Exit(code=1)
        typer.echo("stopped")
