"""The cluster's pieces that need no Ray: replica records and each replica's cores.

The whole cluster, with real replicas, is tests/test_cluster.py (slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_lite.cluster.launch import Cluster, ClusterOptions
from adapterhub_lite.cluster.replica import core_slice
from adapterhub_lite.serving.supervisor.launcher import ServeOptions


def test_each_replica_gets_cores_of_its_own_while_there_are_enough():
    assert [core_slice([0, 1], r, 1) for r in range(2)] == ["0", "1"]
    assert [core_slice(list(range(8)), r, 4) for r in range(2)] == ["0,1,2,3", "4,5,6,7"]
    assert core_slice([0, 1], 2, 1) == "0"  # a third replica on two cores shares, it is not refused
    assert core_slice([2, 5, 7], 0, 8) == "2,5,7"  # more than the host has: all of them
    assert core_slice([0, 1, 2], 1, 2) == "0,1"  # one whole slice only: the odd core stays free


def test_a_replica_killed_outright_is_dropped_from_the_records(tmp_path):
    """A replica whose process died without removing its record (kill -9) is no longer listed;
    records from other hosts are kept (their pids mean nothing here)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    records = {
        "live": {"host": socket.gethostname(), "pid": os.getpid()},
        "dead": {"host": socket.gethostname(), "pid": dead.pid},
        "remote": {"host": "another-host.invalid", "pid": dead.pid},
    }
    for name, record in records.items():
        (tmp_path / f"replica-{name}.json").write_text(json.dumps({"replica": name, **record}))
    cluster = Cluster(ClusterOptions(serve=ServeOptions(base_dir="embedded"), state_dir=str(tmp_path)))
    assert sorted(r["replica"] for r in cluster.replicas()) == ["live", "remote"]
    assert not (tmp_path / "replica-dead.json").exists()


def test_replica_caches_beyond_the_replica_count_and_old_random_ones_are_pruned(tmp_path):
    """Each replica reuses `replica-<rank>`; a restart with fewer replicas, and folders named by Ray's
    random replica id (earlier versions), leave nothing behind; bundle entries of the root stay."""
    from adapterhub_lite.cluster.launch import prune_replica_caches

    for name in ("replica-0", "replica-1", "replica-2", "k3j9x0ab", "sha256-" + "0" * 64):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    removed = prune_replica_caches(str(tmp_path), replicas=2)
    assert sorted(p.name for p in removed) == ["k3j9x0ab", "replica-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica-0", "replica-1", "sha256-" + "0" * 64]
    assert prune_replica_caches(str(tmp_path / "absent"), replicas=1) == []


def test_a_private_temp_folder_is_removed_when_its_owner_is_gone():
    import shutil
    import tempfile

    from adapterhub_lite.serving.supervisor import scratch

    # A root of its own, short enough to be used as given (a long one falls back to the system's).
    root = Path(tempfile.mkdtemp(prefix="t-", dir=scratch.SHORT_ROOT))

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = scratch.make("vllm", os.getpid(), root=root)
        theirs = scratch.make("vllm", child.pid, root=root)
        assert oct(mine.stat().st_mode & 0o777) == "0o700"
        assert scratch.prune("vllm", root=root) == []  # both owners alive
    finally:
        child.kill()
        child.wait()
    assert scratch.prune("vllm", root=root) == [theirs]
    assert mine.is_dir() and not theirs.exists()
    scratch.remove(mine)
    assert list(root.iterdir()) == []
    shutil.rmtree(root)


def test_the_ray_token_is_private_and_made_once(tmp_path, monkeypatch):
    from adapterhub_lite.cluster import state

    monkeypatch.setenv("HOME", str(tmp_path))
    token = state.ray_token_file()
    assert token == tmp_path / ".adapterhub" / "cluster" / "ray-auth-token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    assert oct(token.parent.stat().st_mode & 0o777) == "0o700"
    first = token.read_text()
    assert len(first) == 64
    token.chmod(0o644)
    assert state.ray_token_file().read_text() == first
    assert oct(token.stat().st_mode & 0o777) == "0o600"


def test_rays_output_goes_to_the_log_and_the_commands_lines_to_the_terminal(tmp_path):
    """What writes to descriptors 1 and 2 (Ray's C++ core, its child processes, its print thread) lands
    in the log; `say` reaches the terminal; afterwards everything is back in place."""
    script = f"""
import os, subprocess, sys
from pathlib import Path
from adapterhub_lite.cluster.output import OutputToLog
out = OutputToLog(Path({str(tmp_path / "ray.log")!r}))
out.start()
os.write(2, b"graceful_shutdown failed\\n")
print("(raylet) chatter", flush=True)
subprocess.run(["sh", "-c", "echo from-a-child >&2"])
out.say("phase line")
out.stop()
print("after", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "phase line\nafter\n" and r.stderr == ""
    log = (tmp_path / "ray.log").read_text()
    assert "graceful_shutdown failed" in log and "(raylet) chatter" in log and "from-a-child" in log
    assert oct((tmp_path / "ray.log").stat().st_mode & 0o777) == "0o600"


def test_serve_replicas_grpc_server_is_rewritten_to_loopback():
    from ray.serve._private import replica as replica_module

    from adapterhub_lite.cluster.ray_compat import keep_replica_grpc_on_loopback

    seen = []
    original = replica_module.add_port_to_grpc_server
    replica_module.add_port_to_grpc_server = lambda server, address: seen.append(address) or 1
    try:
        assert keep_replica_grpc_on_loopback() and keep_replica_grpc_on_loopback()  # idempotent
        replica_module.add_port_to_grpc_server(None, "[::]:0")
        replica_module.add_port_to_grpc_server(None, "10.0.0.5:7000")
    finally:
        replica_module.add_port_to_grpc_server = original
    assert seen == ["127.0.0.1:0", "10.0.0.5:7000"]


def test_the_cli_default_for_rate_limit_failure_is_the_servings():
    from adapterhub_lite.serving.config import ServingConfig
    from cli.common import DEFAULT_RATE_LIMIT_FAILURE

    assert DEFAULT_RATE_LIMIT_FAILURE.value == ServingConfig.rate_limit_failure


def test_a_vllm_log_per_port_and_no_more_than_the_bound(tmp_path):
    from adapterhub_lite.serving.supervisor.launcher import MAX_LOGS, default_log_path

    for port in range(MAX_LOGS + 5):
        default_log_path(port, tmp_path).write_text("x")
    assert len(list(tmp_path.glob("vllm-*.log"))) == MAX_LOGS
    assert default_log_path(7, tmp_path) == tmp_path / "vllm-7.log"


def _ingress_request(headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    from starlette.requests import Request

    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive():
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "query_string": b"",
        "headers": headers,
    }
    return Request(scope, receive)


@pytest.mark.parametrize(
    ("headers", "chunks", "status"),
    [
        ([(b"content-length", "²".encode())], [b"{}"], 400),  # "²".isdigit() is true; int() refuses it
        ([(b"content-length", str(64 * 1024 * 1024).encode())], [b"{}"], 413),
        ([], [b"x" * (1024 * 1024)] * 9, 413),  # no length declared: stopped at the limit while reading
    ],
)
def test_the_ingress_refuses_bad_or_oversized_bodies_before_routing(headers, chunks, status):
    """The cluster's front door: a clear 4xx before any replica is asked, never a 500 or an unbounded read."""
    import asyncio

    from adapterhub_lite.cluster.ingress import IngressServer

    ingress = IngressServer.__new__(IngressServer)  # no Ray: the body checks come before any routing
    response = asyncio.run(ingress.__call__(_ingress_request(headers, chunks)))
    assert response.status_code == status


def test_a_long_tmpdir_falls_back_to_a_root_short_enough_for_socket_paths(tmp_path):
    """vLLM's ZeroMQ sockets live in the scratch folder; under a deep $TMPDIR their paths passed 107
    bytes and vLLM refused to start (the first tutorial's test did, under pytest's tmp_path)."""
    from adapterhub_lite.serving.supervisor import scratch

    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    folder = scratch.make("vllm", os.getpid(), deep)
    try:
        assert len(str(folder / "082aab1c-b95c-4867-967f-2d2493547e6d")) <= 107
        assert folder.parent == scratch.SHORT_ROOT
    finally:
        scratch.remove(folder)
    assert not folder.exists()
    short = tmp_path.parent.parent if len(str(tmp_path)) > scratch.MAX_ROOT_CHARS else tmp_path
    if len(str(short)) <= scratch.MAX_ROOT_CHARS:  # a short root is used as given
        kept = scratch.make("vllm", os.getpid(), short)
        assert kept.parent == short
        scratch.remove(kept)
