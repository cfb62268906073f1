"""A real hub for the hub tests: uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningHub:
    url: str
    registry_dir: Path
    state_dir: Path
    app: object
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, namespace: str, scope: str) -> str:
        key = f"{namespace}:{scope}"
        if key not in self.tokens:
            secret, _ = self.app.state.hub.tokens.create(namespace, scope)
            self.tokens[key] = secret
        return self.tokens[key]

    def client(self, namespace: str | None = None, scope: str = "read"):
        from adapterhub_lite.registry.remote import RemoteRegistry

        return RemoteRegistry(self.url, token=self.token(namespace, scope) if namespace else "")

    def get(self, path: str, token: str | None = None, headers: dict | None = None, **kw) -> httpx.Response:
        headers = {**(headers or {}), **({"authorization": f"Bearer {token}"} if token else {})}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kw)

    def uploads_left(self) -> list[str]:
        return sorted(p.name for p in (self.state_dir / "uploads").iterdir())


@contextmanager
def running_hub(registry_dir: Path, limits=None, **config) -> Iterator[RunningHub]:
    """Start a hub over `registry_dir` (created if new), with the connection limits `hub serve` uses
    (or `limits`); stop it on exit.

    vLLM's validator is off unless asked for: importing vLLM takes 10-30 s on the test machines, which
    the fast suite cannot afford; the browser test (slow) runs the hub with it on.
    """
    config.setdefault("vllm_check", False)
    import uvicorn

    from adapterhub_lite.hub import HubConfig, Limits, create_app, uvicorn_config
    from adapterhub_lite.registry import open_registry

    registry = open_registry(registry_dir)
    state = Path(registry_dir) / "hub"
    app = create_app(registry, HubConfig(state_dir=state, **config))
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits or Limits()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        raise RuntimeError("the hub did not answer /health within 30 s")
    try:
        yield RunningHub(url, Path(registry_dir), state, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def with_loss_history(adapter_dir: Path, out: Path, steps: int = 30) -> Path:
    """A copy of a trained adapter directory whose training record carries a per-step loss history."""
    import shutil

    shutil.copytree(adapter_dir, out)
    record_path = out / "training_record.json"
    record = json.loads(record_path.read_text())
    record["losses"] = [[s, round(2.5 * 0.93**s + 0.4, 4)] for s in range(1, steps + 1)]
    record_path.write_text(json.dumps(record))
    return out


@contextmanager
def served_hub(registry_dir: Path, *args: str, timeout: float = 60.0) -> Iterator[tuple[str, object]]:
    """`adapterhub hub serve` as a user runs it (a subprocess, its own settings), on a free loopback
    port; yields (its URL, the process); stops it on exit."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli.main import app; app()",
            "hub",
            "serve",
            "--registry",
            str(registry_dir),
        ]
        + ["--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`hub serve` exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"`hub serve` did not answer /health within {timeout:g} s")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
