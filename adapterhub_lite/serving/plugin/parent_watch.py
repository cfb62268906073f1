"""vLLM stops itself when the process that launched it dies without stopping it (kill -9, OOM killer).

`VLLMServer` starts vLLM in a session of its own (so a Ctrl-C reaches the launcher, which stops vLLM
in order), and so nothing stops vLLM when the launcher dies outright: a Ray replica actor killed with
SIGKILL never runs its `__del__`, and its vLLM API server, engine core and workers ran on, holding
memory and a port. The launcher passes its pid in `ADAPTERHUB_PARENT_PID`; the plugin starts
`watch_parent()` in vLLM's API server, whose thread waits on a pidfd of that parent (polling
`getppid()` where pidfds are missing) and, once the parent is gone, stops vLLM the way the launcher
would (`processes.stop_in_order`): SIGTERM to the API server itself, which shuts its engine down in
order and lets the resource tracker clean /dev/shm, then SIGKILL to the whole group if any of it is
still there after a grace period.

Why not `PR_SET_PDEATHSIG`: the signal fires when the *thread* that forked the child exits, not the
process (Ray runs actor code in threads of its own, and a launcher may start vLLM from a worker
thread that ends long before the process does, which would kill a healthy server); it reaches only
the direct child; and it must be set in `preexec_fn`, which is unsafe in a threaded parent.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time

from adapterhub_lite.settings import SettingsError, env_name, settings

ENV_PARENT_PID = env_name("parent_pid")
GRACE_S = 30.0  # the API server's in-order shutdown, then SIGKILL to what is left of the group
_POLL_S = 1.0

logger = logging.getLogger("adapterhub.serving")
_started = False
_lock = threading.Lock()


def parent_to_watch() -> int | None:
    """The launcher's pid if this process is the vLLM API server it started, else None.

    The engine core and the workers inherit the variable but are not session leaders: vLLM stops
    them itself when its API server stops."""
    try:
        pid = settings().parent_pid
    except SettingsError:  # not a pid: this process was not started by the launcher
        return None
    if pid is None or pid <= 0 or os.getsid(0) != os.getpid():
        return None
    return pid


def watch_parent(grace: float = GRACE_S) -> threading.Thread | None:
    """Start the watch thread once per process (None where there is no launcher to watch)."""
    global _started
    parent = parent_to_watch()
    if parent is None:
        return None
    with _lock:
        if _started:
            return None
        _started = True
    thread = threading.Thread(
        target=_watch, args=(parent, grace), name="adapterhub-parent-watch", daemon=True
    )
    thread.start()
    return thread


def _wait_for_exit(parent: int) -> None:
    """Return once `parent` is no longer this process's parent (it exited: we were re-parented)."""
    try:
        fd: int | None = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfds (old kernel), or the parent is already gone
        fd = None
    try:
        while os.getppid() == parent:
            if fd is None:
                time.sleep(_POLL_S)
                continue
            ready, _, _ = select.select([fd], [], [], _POLL_S)
            if ready:  # it exited; re-parenting is done by the time getppid() is asked again
                os.close(fd)
                fd = None
    finally:
        if fd is not None:
            os.close(fd)


def _watch(parent: int, grace: float) -> None:
    _wait_for_exit(parent)
    logger.warning("adapterhub: the launcher (pid %d) is gone; stopping this vLLM server", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)  # normally this process has exited by now, and this thread with it
    logger.warning("adapterhub: vLLM did not stop within %.0f s of SIGTERM; killing its group", grace)
    os.killpg(os.getpgid(0), signal.SIGKILL)
