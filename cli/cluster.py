"""`adapterhub cluster`: several vLLM replicas with the plugin under Ray Serve, routed by adapter affinity."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import run_cli

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
    admin_key: Annotated[
        str | None, typer.Option(envvar="ADAPTERHUB_ADMIN_KEY", help="admin key for every replica")
    ] = None,
    cores_per_replica: Annotated[
        int | None,
        typer.Option(help="pin each replica's vLLM to this many cores of its own (default: all cores)"),
    ] = None,
) -> None:
    """Start N replicas and the ingress; Ctrl-C stops them all."""
    from adapterhub_lite.cluster.launch import Cluster, ClusterOptions, quiet_ray_env, run_until_stopped
    from adapterhub_lite.serving.launcher import ServeOptions

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
        **{k: v for k, v in given.items() if v is not None},
    )
    quiet_ray_env()
    opts = ClusterOptions(
        serve=serve,
        replicas=replicas,
        affinity=affinity,
        ray_address=ray_address,
        host=host,
        port=port,
        cores_per_replica=cores_per_replica,
    )
    cluster = Cluster(opts)
    typer.echo(f"starting {replicas} replicas under Ray Serve (each loads the model: minutes on a CPU) ...")
    cluster.start()
    typer.echo(f"serving on {cluster.url}/v1  (OpenAI API; tenants use their own keys)")
    for replica in cluster.replicas():
        typer.echo(f"  replica {replica['replica']}: {replica['url']} (its /metrics: admin key)")
    if not admin_key:
        typer.echo(f"admin key (shown once): {cluster.admin_key}")
    run_until_stopped(cluster)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
