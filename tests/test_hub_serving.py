"""A real vLLM server with the plugin resolving adapters from a hub URL with a read token (slow).

The hub runs in this process (uvicorn, loopback); vLLM runs as its own process and reaches the hub only
over HTTP: `--registry http://...` and `ADAPTERHUB_TOKEN` in its environment.
"""

from __future__ import annotations

import os

import openai
import pytest
from hub_fixtures import running_hub
from test_serving_vllm import _base_dir, _complete, _make_adapters

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    root = tmp_path_factory.mktemp("hub-serving")
    base = _base_dir()
    dirs, expected = _make_adapters(base, root / "adapters", {"bot": 1, "secret": 2})
    with running_hub(root / "registry") as hub:
        acme = hub.client("acme", "publish")
        bot = acme.publish(
            pack_bundle(
                dirs["bot"],
                root / "bot.tar",
                namespace="acme",
                name="bot",
                version="1.0.0",
                base_dir=base,
                archive=True,
            )
        ).ref
        hub.client("globex", "publish").publish(
            pack_bundle(
                dirs["secret"],
                root / "secret.tar",
                namespace="globex",
                name="secret",
                version="1.0.0",
                base_dir=base,
                archive=True,
            )
        )
        store = TenantStore.open(root / "tenants.db")
        _, key = store.add_tenant("acme", base_access=True)
        store.set_alias("acme", "bot", bot)
        opts = ServeOptions(
            base_dir=str(base),
            served_name="base",
            registry=hub.url,
            tenants_db=str(root / "tenants.db"),
            cache_dir=str(root / "cache"),
            max_loras=2,
            max_cpu_loras=2,
            max_lora_rank=16,
            max_model_len=256,
            log_path=str(root / "vllm.log"),
        )
        old = os.environ.get("ADAPTERHUB_TOKEN")
        os.environ["ADAPTERHUB_TOKEN"] = hub.token("acme", "read")  # inherited by the vLLM process
        try:
            server = VLLMServer(opts, startup_timeout=900).start()  # the shared 2-core machine is slow
        finally:
            if old is None:
                os.environ.pop("ADAPTERHUB_TOKEN")
            else:
                os.environ["ADAPTERHUB_TOKEN"] = old
        try:
            yield {"url": server.url, "key": key, "expected": expected, "bot": bot}
        finally:
            server.stop()


def test_vllm_resolves_adapters_from_a_hub_url(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=served["key"], max_retries=0)
    r, tokens = _complete(client, "bot")
    assert r.model == served["bot"]
    assert tokens == served["expected"]["bot"]
    # globex's private adapter: the hub answers 404 to acme's read token, so the server cannot serve it.
    with pytest.raises(openai.NotFoundError):
        _complete(client, "globex/secret@1.0.0")
