"""`adapterhub serve` as a user runs it: starts vLLM with the plugin, answers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_serve_starts_answers_and_stops_on_ctrl_c(tmp_path):
    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.serving.launcher import free_port
    from adapterhub_lite.serving.tenancy import TenantStore

    if not (EMBEDDED_BASE_DIR / "config.json").is_file():
        pytest.skip("the embedded base is not built")
    _, key = TenantStore.open(tmp_path / "t.db").add_tenant("acme", base_access=True)
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "adapterhub"),
        "serve",
        "--port",
        str(port),
        "--tenants-db",
        str(tmp_path / "t.db"),
        "--registry",
        str(tmp_path / "reg"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-model-len",
        "128",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "ADAPTERHUB_ADMIN_KEY": ""},
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("admin key"):
                break
        out = "".join(lines)
        assert f"serving on http://127.0.0.1:{port}/v1" in out
        admin = re.search(r"admin key \(shown once\): (\S+)", out).group(1)
        url = f"http://127.0.0.1:{port}"
        name = EMBEDDED_BASE_DIR.name
        r = httpx.post(
            url + "/v1/completions",
            json={"model": name, "prompt": "The capital of", "max_tokens": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert (
            httpx.get(url + "/adapterhub/v1/status", headers={"Authorization": f"Bearer {admin}"}).status_code
            == 200
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
