"""Start and stop the cluster: N replicas and the ingress as one Ray Serve application.

    with Cluster(ClusterOptions(serve=ServeOptions(base_dir=...), replicas=2)) as cluster:
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=tenant_key)

Without `ray_address` a local Ray instance is started for this process (one machine); with
`ray_address="auto"` (or `ray://host:10001`) the application is deployed onto a running Ray cluster,
whose nodes must see the same tenant store and registry (a database URL and a hub or shared registry).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adapterhub_lite.cluster.affinity import AffinityKeyer
from adapterhub_lite.cluster.ingress import IngressServer
from adapterhub_lite.cluster.replica import ReplicaServer
from adapterhub_lite.errors import ServingError
from adapterhub_lite.serving.launcher import ServeOptions

APP_NAME = "adapterhub"


@dataclass
class ClusterOptions:
    """How to run the cluster; the fields mirror `adapterhub cluster up`'s flags."""

    serve: ServeOptions
    replicas: int = 2
    affinity: bool = True  # False: Ray's default routing (power of two choices, no affinity)
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: str | None = None  # where replicas record their URLs (default: a temp folder)
    startup_timeout: float = 600.0
    cores_per_replica: int | None = None  # pin each replica's vLLM to its own cores (None: all cores)


def make_keyer(tenants_db: str | None, registry: str | None, served_name: str) -> AffinityKeyer:
    """The ingress's keyer (a module-level function, so Ray can ship it to the ingress's process)."""
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.tenancy import TenantStore

    def open_the_registry() -> Any:
        return open_registry(registry)  # a path or a database URL (a Path would mangle postgresql://)

    return AffinityKeyer(TenantStore.open(tenants_db), open_the_registry, {served_name})


def build_app(opts: ClusterOptions, served_name: str) -> Any:
    """The Ray Serve application: the ingress bound to a deployment of `opts.replicas` replicas."""
    from ray import serve

    held = opts.serve.max_loaded or opts.serve.max_cpu_loras
    replica_cls = type(
        "AdapterhubReplica",
        (ReplicaServer,),
        {"hold": serve.multiplexed(max_num_models_per_replica=held)(ReplicaServer.hold)},
    )
    replicas = serve.deployment(
        replica_cls,
        name="replica",
        num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": 0},  # vLLM's threads do the work; Ray must not refuse to place it
        health_check_period_s=5,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30,
        max_ongoing_requests=256,
    )
    ingress = serve.deployment(
        IngressServer, name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024
    )
    keyer = functools.partial(make_keyer, opts.serve.tenants_db, opts.serve.registry, served_name)
    return ingress.bind(
        replicas.bind(dataclasses.asdict(opts.serve), opts.state_dir, opts.cores_per_replica),
        keyer,
        opts.affinity,
    )


class Cluster:
    """The running application; a context manager that starts it and always stops it."""

    def __init__(self, opts: ClusterOptions) -> None:
        if opts.replicas < 1:
            raise ServingError(f"--replicas must be at least 1 (got {opts.replicas})")
        self.opts = opts
        if not opts.serve.admin_key:  # one admin key for every replica, so /metrics is reachable on each
            opts.serve.admin_key = "ahadmin_" + secrets.token_urlsafe(24)
        if not opts.state_dir:
            opts.state_dir = tempfile.mkdtemp(prefix="adapterhub-cluster-")
        self._started_ray = False

    @property
    def url(self) -> str:
        return f"http://{self.opts.host}:{self.opts.port}"

    @property
    def admin_key(self) -> str:
        return str(self.opts.serve.admin_key)

    def start(self) -> Cluster:
        """Start Ray (unless joining one), deploy, and block until every replica is healthy."""
        import ray
        from ray import serve

        from adapterhub_lite.base import resolve_base_dir

        base = resolve_base_dir(self.opts.serve.base_dir)
        self.opts.serve.base_dir = str(base)
        served = self.opts.serve.served_name or base.name
        quiet_ray_env()
        if not ray.is_initialized():
            ray.init(
                address=self.opts.ray_address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
            self._started_ray = True
        serve.start(http_options={"host": self.opts.host, "port": self.opts.port})
        serve.run(build_app(self.opts, served), name=APP_NAME, route_prefix="/", blocking=False)
        deadline = time.monotonic() + self.opts.startup_timeout
        while time.monotonic() < deadline:
            if len(self.replicas()) >= self.opts.replicas and self._healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise ServingError(f"the cluster did not become ready within {self.opts.startup_timeout:.0f} s")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas that recorded themselves: id, URL, host and pids of each. The record of a
        replica whose process on this host is gone (killed outright, so it could not remove it) is
        dropped."""
        out = []
        host = socket.gethostname()
        for path in sorted(Path(str(self.opts.state_dir)).glob("replica-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a replica being replaced
            if record.get("host") == host and not _alive(record.get("pid")):
                path.unlink(missing_ok=True)
                continue
            out.append(record)
        return out

    def stop(self) -> None:
        """Delete the application (each replica stops its vLLM) and stop Ray if this process started it."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def quiet_ray_env() -> None:
    """Keep Ray's own banners and usage reporting off the user's terminal and off the network."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def run_until_stopped(cluster: Cluster, poll_seconds: float = 1.0) -> None:
    """Block until Ctrl-C or SIGTERM, then stop the cluster (the CLI's foreground mode)."""
    import signal

    stop: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        cluster.stop()
