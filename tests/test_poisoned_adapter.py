"""A poisoned adapter stays in its lane: NaN weights in one adapter never reach another tenant's output.

Bundles with non-finite weights are refused by verify, so the only way such an adapter reaches a server is
an admin loading a directory directly (`/v1/load_lora_adapter`, no checks). This guards what happens then:
vLLM serves several adapters in one batch, and a batched LoRA kernel that multiplies every row by every
adapter's weights under a mask (0 * NaN = NaN) would spill the NaN into the other rows. Against a real vLLM
CPU server (with the plugin's grouped CPU LoRA ops), the poisoned adapter is requested in the same batches
as two tenants' adapters, short prompts and long prefills alike, and the tenants' greedy tokens must still
equal offline peft.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest
from test_serving_vllm import PROMPT_IDS, _base_dir, _make_adapters

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LONG = 150  # >= 128 prompt tokens: the grouped CPU LoRA ops path
N_TOKENS = 6


def _poison(adapter_dir: Path, out: Path) -> Path:
    """A copy of a PEFT adapter directory with NaN and +-Inf in every LoRA matrix."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out)
    weights = load_file(out / "adapter_model.safetensors")
    for name, t in weights.items():
        t = t.clone()
        t.view(-1)[::3] = float("nan")
        t.view(-1)[1::3] = float("inf")
        t.view(-1)[2::7] = float("-inf")
        weights[name] = t
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _offline(base: Path, adapter_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir
    ).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(N_TOKENS):
                x = torch.cat([x, model(input_ids=x).logits[0, -1].argmax().view(1, 1)], dim=1)
        out.append(x[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="module")
def lanes(tmp_path_factory):
    from adapterhub_lite.bundles import check_bundle, pack_bundle
    from adapterhub_lite.errors import BundleError
    from adapterhub_lite.registry import Registry
    from adapterhub_lite.serving import ServeOptions, TenantStore, VLLMServer

    root = tmp_path_factory.mktemp("poison")
    base = _base_dir()
    dirs, _ = _make_adapters(base, root / "adapters", {"acme": 11, "globex": 12})
    poison = _poison(dirs["acme"], root / "adapters" / "poison")
    with pytest.raises(BundleError, match="non-finite"):  # the checks would never let it in
        pack_bundle(
            poison, root / "poison.bundle", namespace="evil", name="p", version="1.0.0", base_dir=base
        )
    prompts = [PROMPT_IDS, [(11 * i + 5) % 1400 + 3 for i in range(LONG)]]
    expected = {t: _offline(base, dirs[t], prompts) for t in ("acme", "globex")}

    reg = Registry.open(root / "registry")
    store = TenantStore.open(root / "tenants.db")
    keys = {}
    for tenant in ("acme", "globex"):
        bundle = pack_bundle(
            dirs[tenant],
            root / f"{tenant}.bundle",
            namespace=tenant,
            name="bot",
            version="1.0.0",
            base_dir=base,
        )
        check_bundle(bundle, base_dir=base)
        ref = reg.publish(bundle).ref
        _, keys[tenant] = store.add_tenant(tenant)
        store.set_alias(tenant, "bot", ref)
    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / "cache"),
        max_loras=4,  # the poisoned adapter and both tenants' fit in one batch
        max_cpu_loras=4,
        max_loaded=4,
        max_lora_rank=16,
        max_model_len=256,
        log_path=str(root / "vllm.log"),
    )
    server = VLLMServer(opts).start()
    try:
        yield {
            "url": server.url,
            "admin": server.admin_key,
            "keys": keys,
            "poison": poison,
            "prompts": prompts,
            "expected": expected,
        }
    finally:
        server.stop()


def _complete(url: str, key: str, model: str, prompt: list[int]) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=300,
    )


@pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.32 CPU: a NaN adapter's batch-mates get NaN logits (token 0) in ~10% of completions, with "
    "vLLM's own reference LoRA ops as with the grouped ones, and without a shared prompt prefix; the leak is "
    "in vLLM's batch path, not in adapterhub's ops. Until it is fixed, the server must not load such an "
    "adapter at all (bundles.values.scan_file on the admin-load route). Remove this marker when it passes.",
)
def test_nan_adapter_in_the_same_batches_leaves_other_tenants_exact(lanes):
    url, admin = lanes["url"], lanes["admin"]
    loaded = httpx.post(
        url + "/v1/load_lora_adapter",
        headers={"Authorization": f"Bearer {admin}"},
        json={"lora_name": "poison", "lora_path": str(lanes["poison"])},
        timeout=300,
    )
    assert loaded.status_code == 200, loaded.text

    wrong = []
    for round_ in range(3):
        got: dict[tuple[str, int, int], list[int] | str] = {}
        barrier = threading.Barrier(3 * len(lanes["prompts"]) * 2)

        def ask(who: str, i: int, copy: int, got=got, barrier=barrier) -> None:
            key, model = (admin, "poison") if who == "poison" else (lanes["keys"][who], "bot")
            barrier.wait()
            r = _complete(url, key, model, lanes["prompts"][i])
            got[(who, i, copy)] = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text

        threads = [
            threading.Thread(target=ask, args=(who, i, copy))
            for copy in range(2)
            for i in range(len(lanes["prompts"]))
            for who in ("poison", "acme", "globex")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == len(threads)
        wrong += [
            f"round {round_} {who} {'long' if i else 'short'} prompt (copy {copy}): {tokens}, "
            f"offline peft {lanes['expected'][who][i]}"
            for (who, i, copy), tokens in sorted(got.items())
            if who != "poison" and tokens != lanes["expected"][who][i]
        ]
    ops = os.environ.get("ADAPTERHUB_CPU_LORA_OPS", "1")
    assert not wrong, (
        f"{len(wrong)} tenant completions changed (ADAPTERHUB_CPU_LORA_OPS={ops}):\n" + "\n".join(wrong)
    )
