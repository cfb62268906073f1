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
import logging
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adapterhub_lite import keys
from adapterhub_lite.cluster.affinity import AffinityKeyer
from adapterhub_lite.cluster.ingress import IngressServer
from adapterhub_lite.cluster.output import OutputToLog
from adapterhub_lite.cluster.replica import ReplicaServer
from adapterhub_lite.cluster.state import (
    RAY_LOG,
    clear,
    ray_token_file,
    replica_log,
    replica_records,
    run_dir,
    write_run,
)
from adapterhub_lite.errors import AdapterHubError, ServingError
from adapterhub_lite.serving.supervisor import scratch
from adapterhub_lite.serving.supervisor.launcher import ServeOptions
from adapterhub_lite.stop_signals import StopSignals
from adapterhub_lite.vllm_compat.launch import root_cause

log = logging.getLogger(__name__)

APP_NAME = "adapterhub"
ENV_RAY_AUTH_MODE = "RAY_AUTH_MODE"
ENV_RAY_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
ENV_RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": the node address is loopback


@dataclass
class ClusterOptions:
    """How to run the cluster; the fields mirror `adapterhub cluster up`'s flags."""

    serve: ServeOptions
    replicas: int = 2
    affinity: bool = True  # False: Ray's default routing (power of two choices, no affinity)
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: str | None = None  # records and logs (default: ~/.adapterhub/cluster/<port>, state.py)
    startup_timeout: float = 600.0
    cores_per_replica: int | None = None  # pin each replica's vLLM to its own cores (None: all cores)
    ray_log: bool = False  # True: Ray's own output goes to <state_dir>/cluster.log, not the terminal


def make_keyer(tenants_db: str | None, registry: str | None, served_name: str) -> AffinityKeyer:
    """The ingress's keyer (a module-level function, so Ray can ship it to the ingress's process)."""
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.tenants.store import TenantStore

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
    loopback = opts.ray_address is None and is_loopback(opts.host)
    return ingress.bind(
        replicas.bind(dataclasses.asdict(opts.serve), opts.state_dir, opts.cores_per_replica, loopback),
        keyer,
        opts.affinity,
        loopback,
    )


class Cluster:
    """The running application; a context manager that starts it and always stops it."""

    def __init__(self, opts: ClusterOptions) -> None:
        if opts.replicas < 1:
            raise ServingError(f"--replicas must be at least 1 (got {opts.replicas})")
        self.opts = opts
        if not opts.serve.admin_key:  # one admin key for every replica, so /metrics is reachable on each
            opts.serve.admin_key = keys.mint("ahadmin_")
        if not opts.state_dir:
            opts.state_dir = str(run_dir(opts.port))
        self._started_ray = False
        self._ray_tmp: Path | None = None
        self._output: OutputToLog | None = None
        self.phases: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://{self.opts.host}:{self.opts.port}"

    @property
    def admin_key(self) -> str:
        return str(self.opts.serve.admin_key)

    @property
    def ray_log(self) -> Path:
        """Where Ray's own output goes (with `opts.ray_log`)."""
        return Path(str(self.opts.state_dir)) / RAY_LOG

    def terminal(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """`say`, or while Ray's output goes to its log, a printer to the terminal itself."""

        def echo(line: str) -> None:
            if self._output is not None and self._output.active:
                self._output.say(line)
            else:
                say(line)

        return echo

    def start(self, say: Callable[[str], None] | None = None) -> Cluster:
        """Start Ray (unless joining one), deploy, and block until every replica is healthy; `say`
        hears each phase. A failure stops what started and raises ServingError in one line."""
        try:
            return self._start(self.terminal(say or (lambda _line: None)))
        except BaseException as exc:
            self.stop()
            if isinstance(exc, AdapterHubError) or not isinstance(exc, Exception):
                raise
            raise ServingError(
                f"the cluster did not start: {_first_line(exc)}", hint=f"Ray's log: {self.ray_log}"
            ) from None

    def _start(self, say: Callable[[str], None]) -> Cluster:
        started = time.monotonic()
        served = self._check_options()
        state = Path(str(self.opts.state_dir))
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        clear(state)  # what a run killed outright left
        prune_replica_caches(self.opts.serve.cache_dir, self.opts.replicas)
        quiet_ray_env()
        local = self.opts.ray_address is None
        if local:  # our own instance: a private token (read when Ray is imported), said explicitly: no banner
            os.environ.setdefault(ENV_RAY_AUTH_MODE, "token")
            os.environ.setdefault(ENV_RAY_TOKEN_PATH, str(ray_token_file()))
            if is_loopback(self.opts.host):
                # Ray resolves "127.0.0.1" to the host's reachable address, and its servers then listen
                # on every interface, unless it takes this host for a single machine (read at import).
                os.environ.setdefault(ENV_RAY_SINGLE_MACHINE, "0")
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise ServingError(
                f"Ray Serve is not installed ({exc.name or exc})",
                hint="pip install 'adapterhub-lite[cluster]' (ray[serve])",
            ) from None
        if self.opts.ray_log:
            self._output = OutputToLog(self.ray_log)
            self._output.start()
        if not ray.is_initialized():
            say(f"starting Ray (its log: {self.ray_log}) ..." if self.opts.ray_log else "starting Ray ...")
            kwargs: dict[str, Any] = {}
            if local:
                self._ray_tmp = scratch.make("ray", os.getpid())
                kwargs["_temp_dir"] = str(self._ray_tmp)
                if is_loopback(self.opts.host):
                    kwargs["_node_ip_address"] = "127.0.0.1"
            try:
                ray.init(
                    address=self.opts.ray_address or "local",  # "local": a new instance, never another run's
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    configure_logging=False,
                    **kwargs,
                )
            except Exception as exc:
                raise ServingError(
                    f"Ray did not start: {_first_line(exc)}", hint=f"Ray's log: {self.ray_log}"
                ) from None
            self._started_ray = True
            self.phases["ray"] = round(time.monotonic() - started, 2)
        deploying = time.monotonic()
        say(
            f"deploying {self.opts.replicas} replicas (each starts vLLM: a minute or more on a CPU; "
            f"logs: {replica_log(state, 0).with_name('replica-<rank>.log')}) ..."
        )
        serve.start(http_options={"host": self.opts.host, "port": self.opts.port})
        serve.run(build_app(self.opts, served), name=APP_NAME, route_prefix="/", blocking=False)
        deadline = time.monotonic() + self.opts.startup_timeout
        announced: set[str] = set()
        while time.monotonic() < deadline:
            records = self.replicas()
            for record in records:
                rid = str(record.get("replica"))
                if rid not in announced:
                    announced.add(rid)
                    after = time.monotonic() - deploying
                    say(
                        f"  replica {record.get('rank', '?')} ready after {after:.1f} s:"
                        f" {record.get('url')} (log: {record.get('log', '-')})"
                    )
            if len(records) >= self.opts.replicas and self._healthy():
                self.phases["replicas"] = round(time.monotonic() - deploying, 2)
                self.phases["total"] = round(time.monotonic() - started, 2)
                write_run(
                    state,
                    {
                        "url": self.url,
                        "pid": os.getpid(),
                        "admin_key": self.admin_key,
                        "replicas": self.opts.replicas,
                    },
                )
                return self
            failed = deploy_failure(serve)
            if failed:
                raise ServingError(f"a replica did not start: {failed}", hint=f"the replicas' logs: {state}")
            time.sleep(1.0)
        raise ServingError(
            f"the cluster did not become ready within {self.opts.startup_timeout:.0f} s",
            hint=f"the replicas' logs: {state}",
        )

    def _check_options(self) -> str:
        """Check what can be checked before anything starts: the serving options (base, ranks, slots)
        and the ingress port. Returns the served model name."""
        from adapterhub_lite.base import resolve_base_dir
        from adapterhub_lite.serving.supervisor.launcher import build_command

        base = resolve_base_dir(self.opts.serve.base_dir)
        self.opts.serve.base_dir = str(base)
        build_command(self.opts.serve)  # raises ServingError on bad --max-lora-rank and slot counts
        if not port_free(self.opts.host, self.opts.port):
            raise ServingError(
                f"port {self.opts.port} on {self.opts.host} is already in use",
                hint="stop what listens there (`adapterhub cluster status --port "
                f"{self.opts.port}`), or choose another with --port",
            )
        return self.opts.serve.served_name or base.name

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas that recorded themselves (see `state.replica_records`)."""
        return replica_records(str(self.opts.state_dir))

    def stop(self, say: Callable[[str], None] | None = None) -> None:
        """Delete the application (each replica stops its vLLM), stop Ray if this process started it,
        and remove what the run made (records, Ray's temp folder); the logs stay."""
        say = self.terminal(say or (lambda _line: None))
        try:
            self._stop_ray(say)
        finally:
            if self._output is not None:
                self._output.stop()
                self._output = None
            if self._ray_tmp is not None:
                scratch.remove(self._ray_tmp)
                self._ray_tmp = None
                scratch.prune("vllm")  # the replicas' vLLM folders, if a replica could not remove its own
            if self.opts.state_dir and Path(str(self.opts.state_dir)).is_dir():
                clear(str(self.opts.state_dir))

    def _stop_ray(self, say: Callable[[str], None]) -> None:
        try:
            import ray
            from ray import serve
        except ImportError:  # nothing of Ray ever started
            return

        if not ray.is_initialized():
            return
        try:
            say(f"stopping {self.opts.replicas} replicas (each stops its vLLM in order) ...")
            try:
                serve.delete(APP_NAME)
                serve.shutdown()
            except Exception as exc:  # Ray going down under us: what is left, Ray's shutdown takes
                log.warning("Ray Serve did not shut down cleanly: %s", _first_line(exc))
        finally:
            if self._started_ray:
                say("stopping Ray ...")
                ray.shutdown()
                self._started_ray = False

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_free(host: str, port: int) -> bool:
    """Whether `port` can be bound on `host` now (as the ingress will bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def is_loopback(host: str) -> bool:
    """Whether the ingress listens on loopback only: then so does the local Ray instance (else Ray's
    servers listen on every interface, as Ray does by default)."""
    return host in ("127.0.0.1", "localhost", "::1")


def prune_replica_caches(cache_dir: str | None, replicas: int) -> list[Path]:
    """Remove the per-replica cache folders no replica of this run will use: `replica-N` for N beyond
    the replica count, and the folders earlier versions named by Ray's random replica id. Each replica
    reuses `replica-<rank>`, so the disk the caches take stays bounded across restarts."""
    root = Path(cache_dir).expanduser() if cache_dir else None
    if root is None or not root.is_dir():
        return []
    removed = []
    for folder in root.iterdir():
        match = re.fullmatch(r"replica-(\d+)", folder.name)
        stale = (match is not None and int(match.group(1)) >= replicas) or bool(
            re.fullmatch(r"[a-z0-9]{8}", folder.name)
        )
        if stale and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def deploy_failure(serve: Any) -> str | None:
    """The root cause of a failed deployment (Ray Serve gave up on a replica), or None."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return None
    if app is None or str(app.status) not in ("DEPLOY_FAILED", "ApplicationStatus.DEPLOY_FAILED"):
        return None
    messages = [app.message or ""] + [d.message or "" for d in app.deployments.values()]
    text = "\n".join(messages)
    from adapterhub_lite.display import safe

    return safe(root_cause(text) or _first_line(text) or "Ray Serve gave up on it", 300)


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:300]
    return text[:300]


def quiet_ray_env() -> None:
    """Keep Ray's usage reporting off the network and its Serve logger quiet."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def run_until_stopped(
    cluster: Cluster,
    say: Callable[[str], None],
    on_ready: Callable[[Callable[[str], None]], None] | None = None,
    poll_seconds: float = 0.5,
) -> None:
    """Start the cluster, call `on_ready` (with a printer that reaches the terminal while Ray's output
    goes to its log), block until SIGINT or SIGTERM, then stop it (the CLI's foreground mode).

    A signal during the start stops what already started (`StopSignals`)."""
    with StopSignals() as signals:
        try:
            try:
                cluster.start(say)
            except KeyboardInterrupt:
                cluster.stop(say)
                say("interrupted while starting: stopped what had started")
                return
            signals.started()
            if on_ready is not None:
                on_ready(cluster.terminal(say))
            while not signals.stop.wait(poll_seconds):
                pass
            stopping = time.monotonic()
            cluster.stop(say)
            say(f"stopped in {time.monotonic() - stopping:.1f} s")  # Ray's output is back in its place
        except BaseException:
            cluster.stop()
            raise


def stop_running(port: int, timeout: float = 180.0) -> None:
    """Stop the cluster whose `cluster up` serves on `port` (SIGTERM, as Ctrl-C in its terminal) and
    wait until its process is gone. ServingError when none runs there or it outlives `timeout`."""
    from adapterhub_lite.cluster.state import alive, read_run
    from adapterhub_lite.errors import ErrorKind

    run = read_run(run_dir(port))
    if run is None:
        raise ServingError(
            f"no cluster is running on port {port}",
            hint="`adapterhub cluster status --port PORT` finds it on another port",
            kind=ErrorKind.NOT_FOUND,
        )
    pid = int(run["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if alive(pid):
        raise ServingError(f"the cluster (pid {pid}) did not stop within {timeout:.0f} s", hint="retry")
