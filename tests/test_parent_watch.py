"""A launched server stops itself when its launcher is killed outright (serving/plugin/parent_watch.py).

Real processes, no vLLM: a launcher process starts a child the way `VLLMServer` starts vLLM (its own
session, `ADAPTERHUB_PARENT_PID` set), the child starts a grandchild in its group (vLLM's engine core),
and the test kills the launcher with SIGKILL. The vLLM version of this, through a Ray replica actor, is
`tests/test_cluster.py::test_a_killed_replica_actor_leaves_no_vllm_behind`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from adapterhub_lite.serving.plugin import parent_watch
from adapterhub_lite.serving.plugin.parent_watch import ENV_PARENT_PID
from adapterhub_lite.serving.supervisor.processes import group_pids

# The children load the module by its path: it needs only the standard library, and importing the
# `adapterhub_lite.serving` package costs seconds on a loaded machine (this file is in the fast suite).
MODULE = parent_watch.__file__

# The "API server": watches its launcher, handles SIGTERM in order (or ignores it), and has a child.
CHILD = textwrap.dedent(
    """
    import importlib.util, os, signal, subprocess, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("parent_watch", sys.argv[4])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = Path(sys.argv[1])
    ignore_term = sys.argv[2] == "ignore"
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    def on_term(*_):
        if ignore_term:
            return
        grandchild.terminate()
        grandchild.wait()
        out.with_suffix(".term").write_text("stopped in order")
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
    module.watch_parent(grace=float(sys.argv[3]))
    out.write_text(str(grandchild.pid))
    while True:
        time.sleep(0.1)
    """
)
# The "launcher": starts the child as VLLMServer starts vLLM, reports its pid, then waits forever.
LAUNCHER = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    env = {**os.environ, sys.argv[1]: str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], *sys.argv[3:]], env=env,
                             start_new_session=True)
    print(json.dumps({"child": child.pid}), flush=True)
    time.sleep(600)
    """
)


def _launch(tmp_path: Path, mode: str, grace: float) -> tuple[subprocess.Popen, int, int]:
    """(launcher, child pid, grandchild pid) once the child is watching."""
    marker = tmp_path / "child.pid"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ENV_PARENT_PID, CHILD, str(marker), mode, str(grace), MODULE],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = json.loads(launcher.stdout.readline())["child"]
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return launcher, child, int(marker.read_text())


def _gone_within(pgid: int, seconds: float) -> float:
    start = time.monotonic()
    while group_pids(pgid):
        assert time.monotonic() - start < seconds, f"still running: {group_pids(pgid)}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_killed_launcher_stops_its_server_in_order(tmp_path):
    launcher, child, grandchild = _launch(tmp_path, "obey", grace=30)
    assert set(group_pids(child)) == {child, grandchild}
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    _gone_within(child, 10)  # the pidfd wakes the watch at once; 10 s leaves room for a loaded machine
    assert (tmp_path / "child.term").read_text() == "stopped in order"  # SIGTERM, not the group kill


def test_a_server_that_ignores_sigterm_is_killed_with_its_group_after_the_grace(tmp_path):
    grace = 1.0
    launcher, child, grandchild = _launch(tmp_path, "ignore", grace=grace)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    took = _gone_within(child, grace + 10)
    assert took >= grace * 0.9  # it waited for an in-order stop first
    assert not (tmp_path / "child.term").exists()


def _parent_to_watch_in_a_child(env_value: str | None, own_session: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != ENV_PARENT_PID}
    if env_value is not None:
        env[ENV_PARENT_PID] = env_value
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('pw', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.parent_to_watch())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, MODULE],
        env=env,
        start_new_session=own_session,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_only_the_launchers_own_child_watches():
    me = str(os.getpid())
    assert _parent_to_watch_in_a_child(me, own_session=True) == me  # vLLM's API server
    assert _parent_to_watch_in_a_child(me, own_session=False) == "None"  # its engine core, its workers
    assert _parent_to_watch_in_a_child("not-a-pid", own_session=True) == "None"
    assert _parent_to_watch_in_a_child(None, own_session=True) == "None"  # a vLLM the user started
