"""Where a benchmark result came from: the command (relative to the repository), the commit, the machine.

Every benchmark puts `provenance()` into the JSON it writes, so a result file says how to reproduce it and
on what it was measured, and names no absolute path of the machine that ran it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def relative(arg: str) -> str:
    """An argument with absolute paths made relative: to the repository, `$TMPDIR`, `~`, or a bare name."""
    if not arg.startswith("/") and "=/" not in arg:
        return arg
    key, sep, value = arg.rpartition("=") if "=/" in arg else ("", "", arg)
    path = Path(value)
    for root, name in ((REPO, ""), (Path(tempfile.gettempdir()), "$TMPDIR"), (Path.home(), "~")):
        try:
            rest = path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        shown = rest.as_posix() if not name else f"{name}/{rest.as_posix()}"
        return f"{key}{sep}{shown or '.'}"
    return f"{key}{sep}<outside the repository>/{path.name}"


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this benchmark, as it would be typed at the repository's root."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (argv[0].endswith(".py") or argv[0] == "-m"):  # sys.argv starts at the script
        argv = [sys.executable, *argv]
    shown = [relative(a) for a in argv]
    if shown and Path(shown[0]).name.startswith("python"):
        shown[0] = ".venv/bin/python"  # whichever interpreter ran it: the project's venv, as documented
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("ADAPTERHUB_BENCH")]
    return shlex.join([*env, *shown])


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The command, commit (and whether the tree had changes), machine and time of this run."""
    commit = _git("rev-parse", "HEAD")
    return {
        "command": command(),
        "commit": commit[:12],
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {
            "cores": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
