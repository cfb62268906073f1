"""A poisoned adapter stays in its lane: one tenant's NaN/Inf never reaches another tenant's output.

Against a real vLLM CPU server (with the plugin's grouped CPU LoRA ops):

- the admin's `/v1/load_lora_adapter` checks a raw directory as a bundle is checked (gateway/admin_load.py):
  NaN weights, a shape the served base does not have, pickles and hub ids are refused with one line;
- an adapter that passes those checks but whose activations overflow (finite weights of 1e30: flagged, not
  refused) is requested in the same batches as two tenants' adapters, short prompts and long prefills
  alike. Its requests run with NaN K/V; vLLM's CPU attention reads whole KV blocks and weights the
  positions past a sequence's end by 0, so a block freed by it used to hand NaN to the next request
  (0 * NaN = NaN). The tenants' greedy tokens must equal offline peft (vllm_compat/isolation.py zeroes new
  blocks); a second server with `ADAPTERHUB_KV_ZEROING=0` (the control) shows the leak;
- an adapter with NaN weights that reaches vLLM's worker anyway (preloaded by vLLM's own `--lora-modules`,
  past every adapterhub check) is made inert there: its answers are the base model's, and the tenants'
  in the same batches stay exact.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from test_serving_vllm import PROMPT_IDS, _base_dir, _make_adapters

LONG = 150  # >= 128 prompt tokens: the grouped CPU LoRA ops path, and a second KV block
N_TOKENS = 6
OVERFLOW = 1e30  # finite in float32; x @ A @ B overflows to Inf, and RMSNorm turns Inf into NaN
# Read at import: the server (a module fixture) starts with the environment the suite was started in,
# while each test body runs with the ADAPTERHUB_* variables cleared (tests/isolation.py).
ZEROING = os.environ.get("ADAPTERHUB_KV_ZEROING", "1")


def _rewrite(adapter_dir: Path, out: Path, change) -> Path:
    """A copy of a PEFT adapter directory with `change(name, tensor)` applied to every LoRA matrix."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out)
    weights = load_file(out / "adapter_model.safetensors")
    weights = {name: change(name, t.clone()) for name, t in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _nan(name, t):
    t.view(-1)[::3] = float("nan")
    t.view(-1)[1::3] = float("inf")
    t.view(-1)[2::7] = float("-inf")
    return t


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
def adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("poison")
    base = _base_dir()
    dirs, _ = _make_adapters(base, root / "adapters", {"acme": 11, "globex": 12})
    return {"root": root, "base": base, "dirs": dirs, "nan": _rewrite(dirs["acme"], root / "nan", _nan)}


@pytest.fixture(scope="module")
def lanes(adapters):
    from adapterhub_lite.bundles import check_bundle, pack_bundle
    from adapterhub_lite.errors import BundleError
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    root, base, dirs = adapters["root"], adapters["base"], adapters["dirs"]
    overflow = _rewrite(dirs["acme"], root / "overflow", lambda name, t: t * OVERFLOW)
    wrong_shape = _rewrite(
        dirs["acme"], root / "wrong-shape", lambda name, t: t[:-1] if "v_proj.lora_B" in name else t
    )
    pickled = root / "pickled"
    shutil.copytree(dirs["acme"], pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(BundleError, match="non-finite"):  # the checks would never let it in as a bundle
        pack_bundle(
            adapters["nan"], root / "nan.bundle", namespace="evil", name="p", version="1.0.0", base_dir=base
        )
    prompts = [PROMPT_IDS, [(11 * i + 5) % 1400 + 3 for i in range(LONG)]]
    expected = {t: _offline(base, dirs[t], prompts) for t in ("acme", "globex")}

    reg = open_registry(root / "registry")
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
    options = {
        "base_dir": str(base),
        "served_name": "base",
        "registry": str(root / "registry"),
        "tenants_db": str(root / "tenants.db"),
        "max_loras": 4,  # the overflowing adapter and both tenants' fit in one batch
        "max_cpu_loras": 4,
        "max_loaded": 4,
        "max_lora_rank": 16,
        "max_model_len": 256,
    }
    server = VLLMServer(
        ServeOptions(
            **options,
            cache_dir=str(root / "cache"),
            log_path=str(root / "vllm.log"),
            # vLLM's own preloading: no adapterhub check sees this directory, only the worker's hook
            lora_modules={"poisoned": str(adapters["nan"])},
        )
    ).start()
    try:
        yield {
            "url": server.url,
            "admin": server.admin_key,
            "keys": keys,
            "nan": adapters["nan"],
            "overflow": overflow,
            "wrong_shape": wrong_shape,
            "pickled": pickled,
            "prompts": prompts,
            "expected": expected,
            "log": root / "vllm.log",
            "options": options,
            "root": root,
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


def _admin_load(lanes, name: str, path: str) -> httpx.Response:
    return httpx.post(
        lanes["url"] + "/v1/load_lora_adapter",
        headers={"Authorization": f"Bearer {lanes['admin']}"},
        json={"lora_name": name, "lora_path": path},
        timeout=300,
    )


def _loaded(lanes) -> list[str]:
    status = httpx.get(
        lanes["url"] + "/adapterhub/v1/status", headers={"Authorization": f"Bearer {lanes['admin']}"}
    )
    assert status.status_code == 200, status.text
    return status.json()["loaded"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    "case, match",
    [
        ("nan", r"adapter_model\.safetensors.*non-finite"),
        ("wrong_shape", r"module '.*v_proj' have shapes"),
        ("pickled", r"adapter_model\.bin is a pickle file"),
        ("hub_id", r"not an absolute path to a directory"),
    ],
)
def test_admin_load_of_an_unfit_directory_is_refused_before_vllm(lanes, case, match):
    from adapterhub_lite.errors import BundleError, http_status

    path = "someone/lora-on-the-hub" if case == "hub_id" else str(lanes[case])
    r = _admin_load(lanes, f"unfit-{case}", path)
    assert r.status_code == http_status(BundleError("")) == 422, r.text  # kind INVALID
    message = r.json()["error"]["message"]
    assert "\n" not in message
    assert re.search(match, message), message
    assert f"unfit-{case}" not in _loaded(lanes)


def _rounds(url: str, admin: str, lanes, poison: str, rounds: int = 3) -> tuple[list[str], dict]:
    """`rounds` times, every prompt twice from `poison` (as the admin) and from each tenant, all at once
    (one batch, as far as vLLM takes them together); the tenants' completions that differ from offline
    peft, and every answer of `poison` by prompt."""
    wrong: list[str] = []
    poisoned: dict[int, list] = {i: [] for i in range(len(lanes["prompts"]))}
    for round_ in range(rounds):
        got: dict[tuple[str, int, int], list[int] | str] = {}
        barrier = threading.Barrier(3 * len(lanes["prompts"]) * 2)

        def ask(who: str, i: int, copy: int, got=got, barrier=barrier) -> None:
            key, model = (admin, poison) if who == poison else (lanes["keys"][who], "bot")
            barrier.wait()
            r = _complete(url, key, model, lanes["prompts"][i])
            got[(who, i, copy)] = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text

        threads = [
            threading.Thread(target=ask, args=(who, i, copy))
            for copy in range(2)
            for i in range(len(lanes["prompts"]))
            for who in (poison, "acme", "globex")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == len(threads)
        for (who, i, _), tokens in got.items():
            if who == poison:
                poisoned[i].append(tokens)
        wrong += [
            f"round {round_} {who} {'long' if i else 'short'} prompt (copy {copy}): {tokens}, "
            f"offline peft {lanes['expected'][who][i]}"
            for (who, i, copy), tokens in sorted(got.items())
            if who != poison and tokens != lanes["expected"][who][i]
        ]
    return wrong, poisoned


@pytest.mark.slow
@pytest.mark.vllm
def test_overflowing_adapter_in_the_same_batches_leaves_other_tenants_exact(lanes):
    url, admin = lanes["url"], lanes["admin"]
    loaded = _admin_load(lanes, "overflow", str(lanes["overflow"]))
    assert loaded.status_code == 200, loaded.text  # finite weights: flagged, not refused
    assert "overflow" in _loaded(lanes)
    log = lanes["log"].read_text(errors="replace")
    assert re.search(r"holds values up to [\d.]+e\+(29|30)", log), "no magnitude warning in the log"

    wrong, poisoned = _rounds(url, admin, lanes, "overflow")
    # Not vacuous: the overflowing adapter was served, and its logits were NaN (greedy picks token 0).
    answers = [tokens for per_prompt in poisoned.values() for tokens in per_prompt]
    assert answers and all(tokens == [0] * N_TOKENS for tokens in answers), answers[:4]
    assert not wrong, (
        f"{len(wrong)} of {3 * 2 * 2 * len(lanes['prompts'])} tenant completions changed "
        f"(ADAPTERHUB_KV_ZEROING={ZEROING}):\n" + "\n".join(wrong)
    )


@pytest.mark.slow
@pytest.mark.vllm
def test_a_nan_adapter_that_reaches_vllms_worker_is_served_inert(lanes):
    """The worker's hook run for real: `poisoned` (NaN/Inf weights) was preloaded by vLLM's own
    `--lora-modules`, so nothing of adapterhub's checked it before vLLM's worker loaded it. The hook
    said so in the log, and zeroed it: its answers are the base model's, token for token (not NaN's
    token 0), and the tenants' answers in the same batches equal offline peft."""
    url, admin = lanes["url"], lanes["admin"]
    log = lanes["log"].read_text(errors="replace")
    assert re.search(r"adapter poisoned \(.*\) holds NaN/Inf weights in \d+ module\(s\)", log), (
        "the worker's hook did not report the NaN adapter"
    )
    base = []
    for prompt in lanes["prompts"]:
        r = _complete(url, admin, "base", prompt)
        assert r.status_code == 200, r.text
        base.append(r.json()["choices"][0]["token_ids"])
    assert all(tokens != [0] * N_TOKENS for tokens in base)  # what a NaN adapter's answer would be
    wrong, poisoned = _rounds(url, admin, lanes, "poisoned", rounds=2)
    for i, answers in poisoned.items():
        assert answers and all(tokens == base[i] for tokens in answers), (i, answers, base[i])
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
@pytest.mark.vllm
def test_without_kv_zeroing_the_overflow_reaches_other_tenants(lanes):
    """The control: the same rounds on a server started with `ADAPTERHUB_KV_ZEROING=0` change tenants'
    completions, so the exact answers above are the zeroing's doing, not luck. Deterministic as far as
    vLLM's block allocator is (a freed block goes back to its free list in a fixed order); what is
    asserted is only that at least one tenant completion changed in three rounds (the security page
    says it was every round)."""
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.settings import env_name

    root = lanes["root"]
    server = VLLMServer(
        ServeOptions(**lanes["options"], cache_dir=str(root / "cache-off"), log_path=str(root / "off.log"))
    )
    server.env[env_name("kv_zeroing")] = "0"
    with server:
        log = (root / "off.log").read_text(errors="replace")
        assert "KV-cache blocks are reused without zeroing" in log
        loaded = httpx.post(
            server.url + "/v1/load_lora_adapter",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            json={"lora_name": "overflow", "lora_path": str(lanes["overflow"])},
            timeout=300,
        )
        assert loaded.status_code == 200, loaded.text
        wrong, _ = _rounds(server.url, server.admin_key, lanes, "overflow")
    assert wrong, "no tenant completion changed without KV zeroing: the control shows no leak"
    print(f"{len(wrong)} of {3 * 2 * 2 * len(lanes['prompts'])} tenant completions changed without zeroing")


@pytest.mark.slow
def test_vllm_worker_makes_an_adapter_with_non_finite_weights_inert(adapters):
    """vLLM's own loader reads the NaN directory; the worker's check zeroes it and says so."""
    import torch
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from adapterhub_lite.vllm_compat.isolation import install, neutralise, non_finite_parts

    def load(path: Path) -> LoRAModel:
        return LoRAModel.from_local_checkpoint(
            str(path),
            {"q_proj", "v_proj", "o_proj", "down_proj"},
            peft_helper=PEFTHelper.from_local_dir(str(path), 256),
            lora_model_id=1,
            device="cpu",
            dtype=torch.float32,
        )

    clean, nan = load(adapters["dirs"]["acme"]), load(adapters["nan"])
    assert non_finite_parts(clean) == [] and neutralise(clean) == []
    assert all(bool(layer.lora_b.abs().sum() > 0) for layer in clean.loras.values())  # left as it was
    bad = neutralise(nan)
    assert len(bad) == len(nan.loras) > 0
    for layer in nan.loras.values():
        assert not layer.lora_a.any() and not layer.lora_b.any() and layer.scaling == 0.0
    assert non_finite_parts(nan) == []
    # Both patches are made in a CPU vLLM of the supported release (and undone: this is a test process).
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    patched = [
        (KVCacheConfig, "needs_kv_cache_zeroing"),
        (CPUModelRunner, "_init_kv_zero_meta"),
        (WorkerLoRAManager, "_load_adapter"),
    ]
    saved = [(cls, attr, cls.__dict__.get(attr)) for cls, attr in patched]
    try:
        assert install() == {"kv_zeroing": True, "lora_values": True}
        assert KVCacheConfig.needs_kv_cache_zeroing.fget(None) is True
    finally:
        for cls, attr, value in saved:
            if value is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, value)


@pytest.mark.slow
def test_vllm_cpu_attention_reads_a_kv_block_past_the_sequence_end():
    """Why new KV blocks are zeroed: vLLM 0.32's CPU kernel weights the positions of a sequence's last
    block past its end by 0 and still reads them, so a NaN left there by the block's previous owner comes
    through (0 * NaN). When this fails, vLLM masks them properly and `zero_new_kv_blocks` may go."""
    import torch
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    heads, kv_heads, dim, block = 4, 2, 64, 128
    isa = _get_attn_isa(torch.float32, block, dim)
    gen = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(n, h, dim, generator=gen) for n, h in ((6, kv_heads), (6, kv_heads), (1, heads)))

    def attend(stale: float) -> torch.Tensor:
        cache = torch.full((2, kv_heads, block, 2 * dim), stale)  # block 1 was someone else's
        key_cache, value_cache = cache.view(2, kv_heads, 2 * block, dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(block, block + 6), isa)
        out = torch.zeros(1, heads, dim)
        starts, lens = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            1, heads, kv_heads, dim, lens, torch.float32, starts, True, -1, isa, False
        )
        ops.cpu_attention_with_kv_cache(
            q, key_cache, value_cache, out, starts, lens, dim**-0.5, True, None, -1,
            torch.tensor([[1]], dtype=torch.int32), 0.0, meta, None,
        )  # fmt: skip
        return out

    assert torch.isfinite(attend(0.0)).all()
    assert torch.equal(attend(0.0), attend(123.0))  # finite leftovers never mattered: zeroing changes nothing
    assert torch.isnan(attend(float("nan"))).all(), "vLLM's CPU attention now masks past the end"
