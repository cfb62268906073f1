"""`adapterhub cluster` as a user runs it: the installed command in a subprocess, with its own HOME and
TMPDIR, a real local Ray instance and real vLLM replicas; checked is what the user sees and what stays.

The start/stop cycle runs twice: the first time started as a background job of a non-interactive shell
(which starts it with SIGINT ignored) and stopped with SIGINT, the second stopped with SIGTERM. Each time:
the start-up phases and log paths are printed, `cluster status` shows the replica, its health and its hot
set, Ray listens on loopback only, its token is private, Ray's chatter stays in the log, and after the
stop nothing is left in TMPDIR and the cache keeps one folder per replica.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

ADAPTERHUB = str(Path(sys.executable).parent / "adapterhub")
START_TIMEOUT_S = 900  # two replicas' vLLM on a busy 2-core host have needed minutes


def _env(home: Path, tmp: Path) -> dict[str, str]:
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp)}
    for name in ("ADAPTERHUB_ADMIN_KEY", "ADAPTERHUB_REGISTRY", "RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_up_on_a_busy_port_says_so_in_one_line(tmp_path):
    home, tmp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="ahl-t-", dir="/tmp"))
    home.mkdir()
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            r = subprocess.run(
                [ADAPTERHUB, "cluster", "up", "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=300,
                env=_env(home, tmp),
            )
        assert r.returncode == 69, r.stderr  # unavailable
        assert "Traceback" not in r.stdout + r.stderr
        assert r.stderr.splitlines()[0] == f"error: port {port} on 127.0.0.1 is already in use", r.stderr
        assert r.stderr.splitlines()[1].startswith("  hint: ")
        assert len(r.stderr.splitlines()) == 2, r.stderr
        assert list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_cluster_status_without_a_cluster_says_so(tmp_path):
    r = subprocess.run(
        [ADAPTERHUB, "cluster", "status", "--port", str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path, tmp_path),
    )
    assert r.returncode == 66 and r.stderr.startswith("error: no cluster is running on port"), r.stderr
    assert "Traceback" not in r.stderr


def _tenant_with_adapter(home: Path, work: Path) -> str:
    """A tenant `acme` whose alias `geo` points at a real adapter for the embedded base, published to
    the registry the cluster reads; returns the tenant's key."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.tenants.store import TenantStore

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR, dtype=torch.float32)
    get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(work / "adapter")
    bundle = pack_bundle(
        work / "adapter", work / "geo.bundle", namespace="acme", name="geo", version="1.0.0",
        base_dir=EMBEDDED_BASE_DIR,
    )  # fmt: skip
    ref = open_registry(str(home / "registry")).publish(bundle).ref
    store = TenantStore.open(str(home / "tenants.db"))
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "geo", ref)
    return key


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def _start(home: Path, tmp: Path, port: int, out: Path, background: bool) -> int:
    """Start `cluster up` and return its pid; in background mode as `cmd &` of a non-interactive bash."""
    args = [
        ADAPTERHUB, "cluster", "up", "--replicas", "1", "--port", str(port),
        "--tenants-db", str(home / "tenants.db"), "--registry", str(home / "registry"),
        "--max-loras", "2", "--max-cpu-loras", "2", "--rate-limit-failure", "closed",
    ]  # fmt: skip
    if background:
        script = " ".join(map(str, args)) + f" > {out} 2>&1 & echo $!"
        shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(home, tmp))
        return int(shell.stdout.strip())
    with open(out, "w") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=_env(home, tmp)).pid


def _wait_for(out: Path, text: str, pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = out.read_text()
        if text in content:
            return content
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, content
        time.sleep(1)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{out.read_text()}")


def _wait_gone(pid: int, timeout: float) -> None:
    try:
        proc = psutil.Process(pid)
        if proc.parent() is not None and proc.parent().pid == os.getpid():
            os.waitpid(pid, 0)
        else:
            proc.wait(timeout)
    except (psutil.NoSuchProcess, ChildProcessError):
        pass


@pytest.mark.slow
@pytest.mark.vllm
def test_cluster_up_twice_shows_its_phases_and_status_stops_on_both_signals_and_leaves_nothing(tmp_path):
    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    if not (EMBEDDED_BASE_DIR / "config.json").is_file():
        pytest.skip("the embedded base is not built")
    home = tmp_path / "home"
    home.mkdir()
    key = _tenant_with_adapter(home, tmp_path)
    tmp = Path(tempfile.mkdtemp(prefix="ahl-t-", dir="/tmp"))  # short: Ray's socket paths must fit
    cache = home / ".adapterhub" / "serve-cache"
    try:
        for cycle, stop_signal in enumerate((signal.SIGINT, signal.SIGTERM)):
            port = _free_port()
            out = tmp_path / f"up-{cycle}.txt"
            pid = _start(home, tmp, port, out, background=cycle == 0)
            try:
                text = _wait_for(out, "admin key (shown once)", pid, START_TIMEOUT_S)
                # phases and where the logs are, as `serve` prints them
                run_dir = home / ".adapterhub" / "cluster" / str(port)
                assert f"starting Ray (its log: {run_dir / 'cluster.log'})" in text, text
                assert "deploying 1 replicas" in text and "replica-<rank>.log" in text, text
                log0 = re.escape(str(run_dir / "replica-0.log"))
                ready0 = rf"replica 0 ready after [\d.]+ s: http://127\.0\.0\.1:\d+ \(log: {log0}\)"
                assert re.search(ready0, text), text
                assert re.search(r"ready in [\d.]+ s \(ray [\d.]+ s, replicas [\d.]+ s\)", text), text
                assert f"serving on http://127.0.0.1:{port}/v1" in text
                # Ray's chatter is in its log, not on the terminal
                for noise in ("Token authentication", "Traceback", "graceful_shutdown", "(raylet)"):
                    assert noise not in text, text
                # the status command: the replica, its health, its hot set
                r = subprocess.run(
                    [ADAPTERHUB, "cluster", "status", "--port", str(port)],
                    capture_output=True, text=True, timeout=120, env=_env(home, tmp),
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                assert f"cluster on http://127.0.0.1:{port}: healthy, 1 of 1 replicas" in r.stdout, r.stdout
                assert re.search(
                    r"replica 0 http://127\.0\.0\.1:\d+  healthy  hot set \(0/2\): none", r.stdout
                )
                done = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    headers={"authorization": f"Bearer {key}"},
                    json={"model": "geo", "prompt": [5, 120, 240], "max_tokens": 2},
                    timeout=300,
                )
                assert done.status_code == 200, done.text
                r = subprocess.run(
                    [ADAPTERHUB, "cluster", "status", "--port", str(port)],
                    capture_output=True, text=True, timeout=120, env=_env(home, tmp),
                )  # fmt: skip
                assert re.search(r"replica 0 \S+  healthy  hot set \(1/2\): acme/geo@1\.0\.0", r.stdout), (
                    r.stdout
                )
                # Ray listens on loopback only; its token is private and not in ~/.ray
                procs = {pid, *(p.pid for p in _descendants(pid))}
                addresses = _listening(procs)
                assert addresses, "found no listening socket: the check below would prove nothing"
                assert {ip for ip, _ in addresses} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
                token = home / ".adapterhub" / "cluster" / "ray-auth-token"
                assert stat.S_IMODE(token.stat().st_mode) == 0o600
                assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
                assert not (home / ".ray" / "auth_token").exists()
            except BaseException:
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid, 240)
                raise
            if stop_signal == signal.SIGINT:  # Ctrl-C, to a background job that started with it ignored
                os.kill(pid, signal.SIGINT)
            else:  # `cluster stop` sends SIGTERM and waits
                stopped = subprocess.run(
                    [ADAPTERHUB, "cluster", "stop", "--port", str(port)],
                    capture_output=True, text=True, timeout=300, env=_env(home, tmp),
                )  # fmt: skip
                assert stopped.returncode == 0 and stopped.stdout.endswith("stopped\n"), stopped.stderr
            _wait_gone(pid, 240)
            text = out.read_text()
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            assert re.search(r"stopped in [\d.]+ s", text), text
            for noise in ("Traceback", "graceful_shutdown", "retries remaining"):
                assert noise not in text, text
            # nothing left: TMPDIR empty, the run's records gone (logs stay), one cache folder per replica
            deadline = time.monotonic() + 60  # vLLM's engine exits a moment after its API server
            while list(tmp.iterdir()) and time.monotonic() < deadline:
                time.sleep(1)
            assert list(tmp.iterdir()) == [], list(tmp.iterdir())
            assert sorted(p.name for p in run_dir.iterdir()) == ["cluster.log", "replica-0.log"]
            assert [p.name for p in cache.iterdir()] == ["replica-0"]
            bundles = [p.name for p in (cache / "replica-0").iterdir() if p.name.startswith("sha256-")]
            assert len(bundles) == 1, bundles  # the one bundle, reused by the next run
            r = subprocess.run(
                [ADAPTERHUB, "cluster", "status", "--port", str(port)],
                capture_output=True, text=True, timeout=120, env=_env(home, tmp),
            )  # fmt: skip
            assert r.returncode == 66 and "no cluster is running" in r.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
