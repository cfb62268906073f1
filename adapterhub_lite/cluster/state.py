"""What a cluster keeps on disk and where; a stop removes what the run made, a restart reuses the rest.

~/.adapterhub/cluster/             0700, the project's state directory for clusters
  ray-auth-token                   0600: the token of the local Ray instance (Ray's own default,
                                   ~/.ray/auth_token, is readable by every local user)
  <port>/                          one cluster, named by its ingress port
    cluster.json                   0600: URL, admin key, pid, for `adapterhub cluster status`; removed at stop
    replica-<id>.json              each replica's URL, rank, pids and log; removed at stop
    cluster.log                    Ray's own output (banners, shutdown chatter); replaced at the next start
    replica-<rank>.log             each replica's vLLM log; replaced at the next start
$TMPDIR/ahl-ray-XXXXXXXX/          Ray's temp folder (sessions, sockets, logs): removed at stop
$TMPDIR/ahl-vllm-XXXXXXXX/         each vLLM's TMPDIR (serving/supervisor/scratch.py): removed at stop
<cache_dir>/replica-<rank>/        each replica's bundle cache: reused by the replica of that rank
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import psutil

from adapterhub_lite.atomic import write_json

CLUSTER_HOME = Path(".adapterhub", "cluster")  # under the home folder
RUN_FILE = "cluster.json"
TOKEN_FILE = "ray-auth-token"
RAY_LOG = "cluster.log"


def cluster_home() -> Path:
    """~/.adapterhub/cluster, created private (0700)."""
    home = Path.home() / CLUSTER_HOME
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o700)
    return home


def run_dir(port: int) -> Path:
    """The folder of the cluster whose ingress listens on `port` (not created)."""
    return Path.home() / CLUSTER_HOME / str(port)


def ray_token_file() -> Path:
    """The local Ray instance's auth token file, made once (0600) and reused by every run."""
    path = cluster_home() / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)  # whatever happened to it since, it stays private
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


def replica_log(state_dir: str | Path, rank: int) -> Path:
    return Path(state_dir) / f"replica-{rank}.log"


def write_run(state_dir: str | Path, record: dict[str, Any]) -> None:
    """Record the running cluster (atomic; the temp file it renames is created 0600)."""
    write_json(Path(state_dir) / RUN_FILE, record)


def read_run(state_dir: str | Path) -> dict[str, Any] | None:
    """The running cluster's record, or None when none is recorded (or its process is gone)."""
    try:
        record = json.loads((Path(state_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not alive(record.get("pid")):
        return None
    return record


def replica_records(state_dir: str | Path) -> list[dict[str, Any]]:
    """The replicas that recorded themselves: id, rank, URL, host, pids and log of each. The record of a
    replica whose process on this host is gone (killed outright, so it could not remove it) is dropped."""
    out = []
    host = socket.gethostname()
    for path in sorted(Path(state_dir).glob("replica-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a replica being replaced
        if not isinstance(record, dict):
            continue
        if record.get("host") == host and not alive(record.get("pid")):
            path.unlink(missing_ok=True)
            continue
        out.append(record)
    return out


def clear(state_dir: str | Path) -> None:
    """Remove the run's records (the logs stay, for reading after the stop)."""
    folder = Path(state_dir)
    (folder / RUN_FILE).unlink(missing_ok=True)
    for path in folder.glob("replica-*.json"):
        path.unlink(missing_ok=True)


def alive(pid: object) -> bool:
    """Whether process `pid` runs (someone else's counts; a zombie, exited but not yet reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
