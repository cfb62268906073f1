"""Prefetch (serving/gateway/prefetch.py): an alias moved by another process is pulled and verified into the
disk cache before its first request.

The real tenancy middleware with the real resolver, registry, bundles and tenant store, served by a real
uvicorn with its lifespan (so nothing but the store's change starts the prefetch); a small ASGI app
stands in for vLLM's routes, which prefetching never calls. The bundles are the embedded base's.
"""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from needs import missing
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.slow

PERIOD = 0.2


async def _vllm_stand_in(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    raise AssertionError(f"prefetching reached vLLM's routes: {scope['path']}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry

    if not (EMBEDDED_BASE_DIR / "config.json").is_file():
        missing("the embedded base is not built (make base)")
    root = tmp_path_factory.mktemp("prefetch")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(root / "adapter")
    reg = open_registry(root / "registry")
    refs = []
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        bundle = pack_bundle(
            root / "adapter", root / version, namespace="acme", name="geo", version=version,
            base_dir=EMBEDDED_BASE_DIR, vllm_check=False,
        )  # fmt: skip
        refs.append(reg.publish(bundle).ref)
    return {"root": root, "reg": reg, "refs": refs, "base": EMBEDDED_BASE_DIR}


def _wait(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_moved_alias_is_fetched_and_verified_before_its_first_request(world, tmp_path):
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver
    from adapterhub_lite.tenants import TenantStore

    old, new, newer = world["refs"]
    store = TenantStore.open(tmp_path / "tenants.db")
    store.add_tenant("acme")
    store.set_alias("acme", "geo", old)  # there before the server starts: not prefetched
    config = ServingConfig(
        admin_key="admin",
        tenants_db=str(tmp_path / "tenants.db"),
        registry=str(world["root"] / "registry"),
        base_dir=str(world["base"]),
        cache_dir=str(tmp_path / "cache"),
        warmup=False,
        prefetch_seconds=PERIOD,
    )
    resolver = AdapterResolver(config)
    metrics = ServingMetrics(CollectorRegistry())
    mw = TenancyMiddleware(_vllm_stand_in, config=config, store=store, resolver=resolver, metrics=metrics)
    from adapterhub_lite.serving.supervisor.launcher import free_port

    server = uvicorn.Server(uvicorn.Config(mw, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, "uvicorn")
        digest = {ref: world["reg"].resolve(ref).digest for ref in world["refs"]}
        _wait(lambda: mw.tenants.version >= 0, "the first look at the store")
        first_look = mw.tenants.version

        other = TenantStore.open(tmp_path / "tenants.db")  # a promote from another process
        other.set_alias("acme", "geo", new)
        _wait(lambda: new in mw.prefetcher.fetched, "the promoted version prefetched")
        assert resolver.cache.get(digest[new]) is not None, "in the disk cache, verified"
        assert list(mw.prefetcher.fetched) == [new]
        assert resolver.cache.get(digest[old]) is None, "what aliases named at start is not prefetched"
        assert mw.tenants.version != first_look

        # a second alias onto a version already targeted: nothing is fetched again
        other.set_alias("acme", "geo-stable", new)
        seen = mw.tenants.version
        _wait(lambda: mw.tenants.version != seen, "the change seen")
        time.sleep(3 * PERIOD)  # a queued fetch would have started by now; none may
        assert list(mw.prefetcher.fetched) == [new] and mw.prefetcher.pending() == []

        # a reference the registry cannot give is recorded once (and logged), and prefetching goes on
        other.set_alias("acme", "typo", "acme/geo@9.9.9")
        other.set_alias("acme", "geo", newer)
        _wait(lambda: newer in mw.prefetcher.fetched, "the next promoted version prefetched")
        assert resolver.cache.get(digest[newer]) is not None
        assert list(mw.prefetcher.fetched) == [new, newer]
        _wait(lambda: len(mw.prefetcher.failed) > 0, "the failed prefetch recorded")  # either order
        time.sleep(3 * PERIOD)  # a retry would have come by now; none may
        assert [ref for ref, _ in mw.prefetcher.failed] == ["acme/geo@9.9.9"], list(mw.prefetcher.failed)
    finally:
        server.should_exit = True
        thread.join(10)
