"""`adapterhub cluster`: several vLLM replicas with the plugin under Ray Serve, routed by adapter affinity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from cli.common import DEFAULT_RATE_LIMIT_FAILURE, RateLimitFailure, print_json, run_cli

cluster_app = typer.Typer(help="Serve from several vLLM replicas under Ray Serve (adapter-affinity routing).")


@cluster_app.command("up")
@run_cli
def up(
    replicas: Annotated[int, typer.Option(help="vLLM replicas, each with the plugin")] = 2,
    base: Annotated[str | None, typer.Option(help="base model directory; default: the embedded base")] = None,
    host: Annotated[str, typer.Option(help="address of the ingress")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the ingress")] = 8000,
    registry: Annotated[
        str | None, typer.Option(help="registry location (else $ADAPTERHUB_REGISTRY)")
    ] = None,
    tenants_db: Annotated[str | None, typer.Option(help="tenant store (else $ADAPTERHUB_TENANTS_DB)")] = None,
    max_loras: Annotated[int | None, typer.Option(help="distinct adapters in one batch, per replica")] = None,
    max_cpu_loras: Annotated[
        int | None, typer.Option(help="adapters vLLM keeps in memory, per replica")
    ] = None,
    max_loaded: Annotated[int | None, typer.Option(help="hot set per replica (also the routing LRU)")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="largest adapter rank served")] = None,
    affinity: Annotated[
        bool, typer.Option(help="route by adapter affinity (--no-affinity: Ray's default)")
    ] = True,
    ray_address: Annotated[
        str | None, typer.Option(help="join a running Ray cluster ('auto', ray://host:10001); default: local")
    ] = None,
    rate_limit_url: Annotated[
        str | None,
        typer.Option(
            envvar="ADAPTERHUB_RATE_LIMIT_URL", help="redis://...: one limit per tenant for all replicas"
        ),
    ] = None,
    rate_limit_failure: Annotated[
        RateLimitFailure,
        typer.Option(
            envvar="ADAPTERHUB_RATE_LIMIT_FAILURE",
            help="while Redis is unreachable: 'open' admits, 'closed' answers 503",
        ),
    ] = DEFAULT_RATE_LIMIT_FAILURE,
    admin_key: Annotated[
        str | None, typer.Option(envvar="ADAPTERHUB_ADMIN_KEY", help="admin key for every replica")
    ] = None,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar="ADAPTERHUB_OTLP_ENDPOINT",
            help="OTLP/HTTP collector (http://HOST:4318): every replica's request traces (default: off)",
        ),
    ] = None,
    cores_per_replica: Annotated[
        int | None,
        typer.Option(help="pin each replica's vLLM to this many cores of its own (default: all cores)"),
    ] = None,
) -> None:
    """Start N replicas and the ingress; Ctrl-C or SIGTERM stops them all."""
    from adapterhub_lite.cluster.launch import Cluster, ClusterOptions, run_until_stopped
    from adapterhub_lite.serving.supervisor.launcher import ServeOptions
    from adapterhub_lite.serving.supervisor.supervise import describe_phases

    given = {
        "max_loras": max_loras,
        "max_cpu_loras": max_cpu_loras,
        "max_loaded": max_loaded,
        "max_lora_rank": max_lora_rank,
    }
    serve = ServeOptions(
        base_dir=base or "embedded",
        registry=registry,
        tenants_db=tenants_db,
        admin_key=admin_key,
        rate_limit_url=rate_limit_url,
        rate_limit_failure=rate_limit_failure.value,
        otlp_endpoint=otlp_endpoint,
        **{k: v for k, v in given.items() if v is not None},
    )
    opts = ClusterOptions(
        serve=serve,
        replicas=replicas,
        affinity=affinity,
        ray_address=ray_address,
        host=host,
        port=port,
        cores_per_replica=cores_per_replica,
        ray_log=True,
    )
    cluster = Cluster(opts)

    def ready(say: Callable[[str], None]) -> None:
        say(describe_phases(cluster.phases))
        say(f"serving on {cluster.url}/v1  (OpenAI API; tenants use their own keys)")
        say(f"status: adapterhub cluster status --port {port}; stop: Ctrl-C, SIGTERM or `cluster stop`")
        if not admin_key:
            say(f"admin key (shown once): {cluster.admin_key}")

    run_until_stopped(cluster, typer.echo, on_ready=ready)


@cluster_app.command("status")
@run_cli
def status(
    port: Annotated[int, typer.Option(help="port of the cluster's ingress")] = 8000,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the running cluster: each replica, its health and its hot set (the adapters it holds)."""
    from adapterhub_lite.cluster.status import cluster_status
    from adapterhub_lite.display import safe

    info = cluster_status(port)
    if as_json:
        print_json(info)
        return
    shown = len(info["replicas"])
    typer.echo(
        f"cluster on {info['url']}: {'healthy' if info['healthy'] else 'NOT healthy'}, "
        f"{shown} of {info['expected_replicas']} replicas (pid {info['pid']})"
    )
    for r in info["replicas"]:
        loaded = r["loaded"]
        hot = "?" if loaded is None else (", ".join(safe(str(a), 80) for a in loaded) or "none")
        cap = f"/{r['capacity']}" if r["capacity"] else ""
        typer.echo(
            f"  replica {r['rank']} {r['url']}  {'healthy' if r['healthy'] else 'NOT healthy'}  "
            f"hot set ({0 if loaded is None else len(loaded)}{cap}): {hot}"
        )


@cluster_app.command("stop")
@run_cli
def stop(
    port: Annotated[int, typer.Option(help="port of the cluster's ingress")] = 8000,
    timeout: Annotated[float, typer.Option(help="seconds to wait for it to stop")] = 180.0,
) -> None:
    """Stop the cluster running on PORT (what Ctrl-C in its terminal does) and wait until it is gone."""
    from adapterhub_lite.cluster.launch import stop_running

    typer.echo(f"stopping the cluster on port {port} ...")
    stop_running(port, timeout)
    typer.echo("stopped")


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
