"""vLLM's process group: who is in it, what shared memory it maps, and stopping it in order (Linux /proc).

vLLM's API server starts an engine-core process, and Python's multiprocessing a resource tracker that
unlinks the shared-memory segments and semaphores the others leaked, once they have all exited. Killing
the whole group at once kills the tracker before it cleans up, and the segments (hundreds of MB) stay
in /dev/shm until the host reboots. So a stop signals only the API server, which shuts the engine down
in order, then waits for the rest of the group to leave by itself, and kills only what lingers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields[0] is the state, fields[2] the process group
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def shm_segments(pids: list[int]) -> set[str]:
    """Paths under /dev/shm that the processes `pids` map or hold open now."""
    found: set[str] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            maps = ""
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            path = parts[5] if len(parts) > 5 else ""
            if path.startswith(str(SHM_DIR) + "/"):
                found.add(path.removesuffix(" (deleted)"))
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(SHM_DIR) + "/"):
                found.add(target.removesuffix(" (deleted)"))
    return found


@dataclass
class Stopped:
    """How a process group ended: the leader's exit code, and the processes that needed SIGKILL."""

    code: int | None
    killed: list[str] = field(default_factory=list)  # "pid name" of each process still there at the end


def stop_in_order(proc: subprocess.Popen, timeout: float = 60.0, linger: float = 20.0) -> Stopped:
    """SIGTERM to the group leader (vLLM's API server shuts its engine down itself), wait up to
    `timeout` s for it, then up to `linger` s for the rest of its group to exit by itself (the resource
    tracker cleans /dev/shm last); SIGKILL only to what is still there, which the result names."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + (linger if proc.poll() is not None else 0)
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = [f"{pid} {_name(pid)}" for pid in group_pids(pgid)]
    if killed:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return Stopped(proc.wait(timeout=10), killed)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        return Stopped(None, killed)


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
