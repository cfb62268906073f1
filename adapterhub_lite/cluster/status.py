"""What `adapterhub cluster status` shows: each replica of a running cluster, its health and hot set.

It reads the cluster's records (state.py) and asks every replica's vLLM directly: `/health`, and the
admin route `/adapterhub/v1/status` for the adapters it holds loaded (its hot set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from adapterhub_lite.cluster.state import read_run, replica_records, run_dir
from adapterhub_lite.errors import ServingError

TIMEOUT_S = 5.0


def _get(url: str, key: str | None = None) -> httpx.Response | None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(url, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError:
        return None


def replica_status(record: dict[str, Any], admin_key: str | None) -> dict[str, Any]:
    """One replica: its record plus `healthy`, `ready` and `loaded` (None where it did not answer)."""
    url = str(record.get("url", ""))
    health = _get(url + "/health")
    status = _get(url + "/adapterhub/v1/status", admin_key) if admin_key else None
    body: dict[str, Any] = {}
    if status is not None and status.status_code == 200:
        try:
            body = status.json()
        except ValueError:
            body = {}
    return {
        "replica": record.get("replica"),
        "rank": record.get("rank"),
        "url": url,
        "log": record.get("log"),
        "healthy": health is not None and health.status_code == 200,
        "ready": body.get("ready"),
        "loaded": body.get("loaded") if isinstance(body.get("loaded"), list) else None,
        "capacity": body.get("capacity"),
    }


def cluster_status(port: int = 8000, state_dir: str | Path | None = None) -> dict[str, Any]:
    """The running cluster on `port` (or recorded in `state_dir`): its URL, ingress health, replicas.

    Raises ServingError (not found) when no cluster is running there.
    """
    folder = Path(state_dir) if state_dir else run_dir(port)
    run = read_run(folder)
    if run is None:
        from adapterhub_lite.errors import ErrorKind

        raise ServingError(
            f"no cluster is running on port {port}" if not state_dir else f"no cluster recorded in {folder}",
            hint="start one with `adapterhub cluster up` (or pass the --port it listens on)",
            kind=ErrorKind.NOT_FOUND,
        )
    url = str(run.get("url", ""))
    ingress = _get(url + "/health")
    replicas = [replica_status(r, run.get("admin_key")) for r in replica_records(folder)]
    replicas.sort(key=lambda r: (r["rank"] is None, r["rank"] if r["rank"] is not None else 0))
    return {
        "url": url,
        "pid": run.get("pid"),
        "healthy": ingress is not None and ingress.status_code == 200,
        "replicas": replicas,
        "expected_replicas": run.get("replicas"),
    }
