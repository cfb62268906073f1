"""A real Prometheus (Debian's `prometheus` package) scrapes a real serving server; PromQL reads per-tenant
token counts and rates back, equal to what the `openai` client was told.

The server's `/metrics` needs the admin key (it is not a public path), so the scrape authenticates with it
as a bearer token, as a production scrape would. Without the `prometheus` binary the test is skipped
locally and fails in CI (`CI=1`); `.ci/run` installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = "the prometheus server is not installed (apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _query(url: str, promql: str) -> dict[tuple, float]:
    """The instant vector `promql` as {label values: value}."""
    r = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    out = {}
    for sample in r.json()["data"]["result"]:
        out[tuple(sorted(sample["metric"].items()))] = float(sample["value"][1])
    return out


def _wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last is not None:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def test_prometheus_reads_per_tenant_tokens_back(tmp_path):
    import openai
    from bundle_fixtures import make_adapter
    from test_serving_vllm import _base_dir

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    binary = _prometheus_binary()
    base = _base_dir()
    adapter = make_adapter(base, tmp_path / "adapter", seed=5)
    bundle = pack_bundle(adapter, tmp_path / "bot.bundle", namespace="acme", name="bot", version="1.0.0",
                         base_dir=base)
    ref = open_registry(tmp_path / "registry").publish(bundle).ref
    store = TenantStore.open(tmp_path / "tenants.db")
    _, acme = store.add_tenant("acme", base_access=True)
    store.set_alias("acme", "bot", ref)
    _, globex = store.add_tenant("globex", base_access=True)
    opts = ServeOptions(
        base_dir=str(base), served_name="base", registry=str(tmp_path / "registry"),
        tenants_db=str(tmp_path / "tenants.db"), cache_dir=str(tmp_path / "cache"), max_loras=2,
        max_cpu_loras=2, max_loaded=2, max_lora_rank=16, max_model_len=256,
        log_path=str(tmp_path / "vllm.log"),
    )
    server = VLLMServer(opts, startup_timeout=900).start()
    prom = None
    try:
        host_port = server.url.split("://", 1)[1]
        (tmp_path / "admin.key").write_text(server.admin_key or "")
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: adapterhub\n"
            f"    static_configs: [{{targets: ['{host_port}']}}]\n"
            f"    authorization: {{type: Bearer, credentials_file: '{tmp_path / 'admin.key'}'}}\n"
        )
        port = _free_port()
        prom_url = f"http://127.0.0.1:{port}"
        prom = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
        )

        def target_up():
            try:
                up = _query(prom_url, f'up{{job="adapterhub",instance="{host_port}"}}')
            except httpx.HTTPError:  # Prometheus still starting
                return None
            return True if list(up.values()) == [1.0] else None  # 0: the scrape failed (auth, say)

        try:
            _wait_for(target_up, 60, "Prometheus to scrape the server")
        except AssertionError:
            tail = (tmp_path / "prometheus.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"Prometheus never scraped the server; its log ends:\n{tail}") from None

        told: dict[str, list[int]] = {"acme": [0, 0], "globex": [0, 0]}
        clients = {
            "acme": (openai.OpenAI(base_url=server.url + "/v1", api_key=acme, max_retries=0), "bot"),
            "globex": (openai.OpenAI(base_url=server.url + "/v1", api_key=globex, max_retries=0), "base"),
        }

        def send(tenant: str, n: int) -> None:
            client, model = clients[tenant]
            for i in range(n):
                u = client.completions.create(model=model, prompt=f"count {i}", max_tokens=4 + i,
                                              temperature=0).usage
                told[tenant][0] += u.prompt_tokens
                told[tenant][1] += u.completion_tokens

        def totals():
            got = {}
            names = ("adapterhub_prompt_tokens_total", "adapterhub_completion_tokens_total")
            for i, name in enumerate(names):
                for labels, value in _query(prom_url, f"sum by (tenant) ({name})").items():
                    got.setdefault(dict(labels)["tenant"], [0, 0])[i] = int(value)
            return got if {t: got.get(t) for t in told} == told else None

        # A series' first sample is its starting point (rate() counts from there): one request each,
        # seen by Prometheus, then the traffic whose rate is read back.
        send("acme", 1)
        send("globex", 1)
        assert _wait_for(totals, 30, "Prometheus to see both tenants")
        send("acme", 4)
        send("globex", 2)
        assert _wait_for(totals, 30, "Prometheus to hold the tokens the clients were told")
        rates = _query(prom_url, "sum by (tenant) (rate(adapterhub_completion_tokens_total[1m]))")
        per_tenant = {dict(labels)["tenant"]: value for labels, value in rates.items()}
        assert per_tenant["acme"] > 0 and per_tenant["globex"] > 0
        by_adapter = _query(prom_url, 'sum by (adapter) (adapterhub_requests_total{tenant="acme"})')
        assert {dict(k)["adapter"]: v for k, v in by_adapter.items()} == {ref: 5.0}
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        server.stop()
