"""Run a started server in the foreground until Ctrl-C, SIGTERM or vLLM's own exit."""

from __future__ import annotations

from collections.abc import Callable

from adapterhub_lite.serving.supervisor.launcher import VLLMServer
from adapterhub_lite.stop_signals import StopSignals


def run_until_stopped(
    server: VLLMServer, say: Callable[[str], None], on_ready: Callable[[], None] | None = None
) -> int | None:
    """Start `server`, call `on_ready`, block until SIGINT/SIGTERM arrives or vLLM exits, then stop vLLM
    in order (a signal during startup stops it too: it runs in its own session, so nothing else would).

    Returns vLLM's exit code when it exited by itself (None after a requested stop).
    """
    with StopSignals() as signals:
        try:
            try:
                server.start()
            except KeyboardInterrupt:
                say("stopping vLLM ...")
                server.stop()
                return None
            signals.started()
            if on_ready is not None:
                on_ready()
            while not signals.stop.wait(0.5):
                if server.process is None or server.process.poll() is not None:
                    code = server.process.returncode if server.process is not None else None
                    server.stop()
                    return code
            say("stopping vLLM (requests in flight finish, then it shuts its engine down in order) ...")
            server.stop()
            if server.killed:
                say(f"killed what did not stop by itself: {', '.join(server.killed)}")
            else:
                say("vLLM stopped")
            return None
        except BaseException:
            server.stop()
            raise


def describe_phases(phases: dict[str, float]) -> str:
    """`ready in 41.2 s (import 12.0 s, model load 3.1 s, ...)`."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "total")
    return f"ready in {phases.get('total', 0.0):.1f} s ({parts})"
