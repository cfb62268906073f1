"""`adapterhub train --processes N`: start N training processes on this machine and watch them.

Each child is the same `adapterhub train` command line (without ``--processes``) with the variables
torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so the trainer joins a gloo (CPU)
or NCCL (CUDA) process group exactly as it does under ``torchrun`` or ``accelerate launch`` (see
`distributed`). It is done here rather than by calling ``accelerate launch`` because that command runs
a single process for CPU training on one machine, and here a failed child must end the run with one
clear line rather than torch.distributed.elastic's report.

When a process dies (killed, out of memory, an error), the others are stopped, and the error names it
and the last complete checkpoint to resume from.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from adapterhub_lite.errors import ErrorKind, TrainingError
from adapterhub_lite.training.checkpoint import list_checkpoints

_ENTRY = "import sys; from cli.main import app; sys.argv[0] = 'adapterhub'; app()"
GRACE_SECONDS = 10.0  # for the others to notice a lost peer and exit by themselves before being stopped


def child_argv(argv: list[str]) -> list[str]:
    """The `adapterhub` arguments from ``train`` on, without ``--processes N`` / ``--processes=N``."""
    args = argv[argv.index("train") :]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _threads_each(n: int) -> str:
    return str(max(1, (os.cpu_count() or n) // n))


def launch_processes(n: int, argv: list[str], output_dir: Path) -> None:
    """Run ``adapterhub <argv>`` (a ``train`` command) in ``n`` data-parallel processes and wait.

    Raises TrainingError naming the first process that failed and the checkpoint to resume from.
    """
    if n < 1:
        raise TrainingError(f"--processes {n}: needs at least 1")
    port = str(_free_port())
    children = []
    for rank in range(n):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        env.setdefault("OMP_NUM_THREADS", _threads_each(n))
        if rank:
            env.update(TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")  # one progress display: the main's
        children.append(subprocess.Popen([sys.executable, "-c", _ENTRY, *argv], env=env))
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [c.poll() for c in children]
            # A process killed by a signal is the cause; the others then fail for want of it.
            bad = sorted(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), key=lambda x: x[1] > 0)
            if bad and failed is None:
                failed = bad[0]
                deadline = time.monotonic() + GRACE_SECONDS
            if all(c is not None for c in codes):
                break
            if failed is not None and time.monotonic() > deadline:
                for c in children:
                    if c.poll() is None:
                        c.terminate()
            time.sleep(0.2)
    except BaseException:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            c.wait()
        raise
    if failed is not None:
        rank, code = failed
        found = list_checkpoints(output_dir / "checkpoints")
        where = (
            f"the last complete checkpoint is {found[-1].path} (step {found[-1].step}): "
            "run the same command with --resume to continue"
            if found
            else "no checkpoint was complete yet"
        )
        raise TrainingError(
            f"process {rank} of {n} {_how(code)}, so the run stopped; {where}", kind=ErrorKind.INTERNAL
        )
