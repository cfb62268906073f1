"""One Ray Serve replica: a vLLM server with the adapterhub plugin and tenancy, and a proxy in front.

The replica starts its own vLLM OpenAI server on a free loopback port (the same launcher as
`adapterhub serve`) and forwards requests to it, streaming. Ray Serve's model multiplexing keeps a
per-replica LRU of the affinity keys it has served; the request router prefers replicas that already
hold a request's key. The LRU is only bookkeeping for routing: vLLM itself loads adapters on first use
and the plugin's evictor unloads cold ones, so both agree on "what this replica holds" as long as the
LRU size equals the plugin's hot-set bound (`launch` sets both from `max_loaded`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from adapterhub_lite.atomic import write_json
from adapterhub_lite.cluster.ray_compat import keep_replica_grpc_on_loopback
from adapterhub_lite.serving.supervisor.launcher import ServeOptions, VLLMServer

OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU build: the cores its OpenMP threads run on
REPLICA_HEADER = "x-adapterhub-replica"  # which replica answered: for operators and the affinity tests
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy recomputes.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "host",
        "content-length",
    }
)


def core_slice(cpus: list[int], local_rank: int, cores: int) -> str:
    """The cores (of `cpus`) that replica `local_rank` of this host gives vLLM's OpenMP threads:
    `cores` of them, disjoint from the other replicas' while there are enough, as vLLM's
    `VLLM_CPU_OMP_THREADS_BIND` list. By default every vLLM binds its threads to every core of the
    host, so replicas on one host spin on the same cores (benchmarks/cluster_bench.py measures it)."""
    cores = max(1, min(cores, len(cpus)))
    start = (local_rank % (len(cpus) // cores)) * cores
    return ",".join(str(c) for c in cpus[start : start + cores])


def forwardable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`headers` without hop-by-hop ones."""
    return [(k, v) for k, v in headers if k.lower() not in _DROP]


def error_body(status: int, message: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": "server_error", "code": status}}).encode()


class ReplicaServer:
    """The replica's body (Ray wraps it with `serve.deployment` and `serve.multiplexed` in `launch`)."""

    def __init__(
        self,
        options: dict[str, Any],
        state_dir: str | None = None,
        cores_per_replica: int | None = None,
        loopback: bool = False,
    ) -> None:
        from ray import serve

        if loopback:
            keep_replica_grpc_on_loopback()

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        rank = getattr(context, "rank", None)
        self.rank = getattr(rank, "rank", None)
        if cores_per_replica:
            local_rank = getattr(rank, "local_rank", 0)
            cpus = sorted(os.sched_getaffinity(0))
            os.environ[OMP_BIND_ENV] = core_slice(cpus, local_rank, cores_per_replica)
        opts = ServeOptions(**options)
        opts.port = None  # a free port of this host, chosen by the launcher
        slot = f"replica-{self.rank}" if self.rank is not None else self.replica_id
        if opts.cache_dir:
            # Each replica its own bounded cache (one folder must have one owner), named by its rank so
            # that the next run's replica of that rank reuses it: disk stays bounded across restarts.
            opts.cache_dir = str(Path(opts.cache_dir) / slot)
        if state_dir and not opts.log_path:  # beside the cluster's records, replaced at the next start
            opts.log_path = str(Path(state_dir) / f"{slot}.log")
        self.server = VLLMServer(opts).start()
        self.url = self.server.url
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=5.0))
        self._state_file: Path | None = None
        if state_dir:
            self._state_file = self._register(Path(state_dir))

    def _register(self, state_dir: Path) -> Path:
        """Write this replica's URL where `adapterhub cluster status` and the benchmark can find it."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / f"replica-{self.replica_id}.json"
        vllm_pid = self.server.process.pid if self.server.process else None
        record = {
            "replica": self.replica_id,
            "rank": self.rank,
            "log": str(self.server.log_path),
            "url": self.url,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "vllm_pid": vllm_pid,
        }
        write_json(path, record)
        return path

    async def hold(self, key: str) -> str:
        """The multiplexed 'load': nothing to do, vLLM loads the adapter on the request itself."""
        return key

    async def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Any]:
        """Proxy one request: yields (status, headers) first, then the body's chunks."""
        from ray import serve

        key = serve.get_multiplexed_model_id()
        if key:
            await self.hold(key)  # bookkeeping for the router (wrapped with serve.multiplexed)
        request = self._client.build_request(method, path, headers=forwardable(headers), content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            yield 503, [("content-type", "application/json"), ("retry-after", "5")]
            yield error_body(503, f"replica unavailable: {type(exc).__name__}")
            return
        try:
            headers = forwardable(list(response.headers.multi_items()))
            yield response.status_code, [*headers, (REPLICA_HEADER, self.replica_id)]
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica (and restart vLLM)."""
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"vLLM exited (code {proc.returncode if proc else None})")
        response = await self._client.get("/health", timeout=10.0)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {response.status_code}")

    def __del__(self) -> None:
        # Not run when the actor's process is killed outright: then vLLM stops itself (parent_watch.py)
        # and `Cluster.replicas()` drops the record of a process that is gone.
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
        if getattr(self, "_state_file", None) is not None:
            self._state_file.unlink(missing_ok=True)
