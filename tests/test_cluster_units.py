"""The cluster's pieces that need no Ray: replica records and each replica's cores.

The whole cluster, with real replicas, is tests/test_cluster.py (slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from adapterhub_lite.cluster.launch import Cluster, ClusterOptions
from adapterhub_lite.cluster.replica import core_slice
from adapterhub_lite.serving.launcher import ServeOptions


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
