"""Keeps one request's non-finite values out of every other request in vLLM 0.32's CPU build.

What leaked (issue #9, `tests/test_poisoned_adapter.py`): vLLM's CPU attention kernel
(`cpu_attention_with_kv_cache`) reads the last KV-cache block of a sequence whole, positions past the
sequence's length included, and gives those positions a softmax weight of 0. Blocks are reused without
being cleared, so a block freed by a request whose K/V went non-finite (an adapter with NaN weights, or
finite weights that overflow) still holds NaN there, and 0 * NaN = NaN poisons the next request that gets
the block. vLLM already knows how to zero new blocks (`KVCacheConfig.needs_kv_cache_zeroing`: the
scheduler lists every newly allocated block, the CPU model runner zeroes them before the step) but turns it
on only for Mamba and mixed-precision caches. Two guarded patches, each made only on the CPU platform of
a vLLM release this seam supports, each logging a line when it is not made:

* `zero_new_kv_blocks`: newly allocated KV blocks are zeroed on CPU. Zeroing a block costs one write of
  it per layer when it is handed out (once per block size of tokens), nothing per step. Masking inside the
  kernel (a select instead of a multiply) would be the cleaner fix, but the kernel is C++ in vLLM's wheel.
* `neutralise_non_finite_loras`: an adapter whose weights (or scaling) hold NaN/Inf is made inert (zeroed)
  when vLLM's worker loads it, with an error line naming it. It is not raised as an error because the
  worker also loads adapters inside a model step, where an exception ends the engine for every tenant;
  requests that can be refused are refused earlier (the resolver's verification,
  `serving/gateway/admin_load.py`).

Both run in every vLLM process (the plugin's `register`); `ADAPTERHUB_KV_ZEROING=0` leaves the first off
(it exists to measure the leak, see tests/test_poisoned_adapter.py).
"""

from __future__ import annotations

import logging
from typing import Any

from adapterhub_lite.settings import env_name, settings
from adapterhub_lite.vllm_compat import SUPPORTED_RELEASES, VLLM

log = logging.getLogger("adapterhub.serving")

KV_ZEROING_SWITCH = env_name("kv_zeroing")


def _supported() -> str | None:
    """Why the patches cannot be made here (None: they can)."""
    if VLLM is None:
        return "vLLM is not installed"
    release = ".".join(VLLM[1].split("+")[0].split(".")[:2])
    if release not in SUPPORTED_RELEASES:
        return f"vLLM {VLLM[1]} is not a release this was written for"
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return "not the CPU platform"
    except Exception as exc:  # a vLLM without this layout: keep its own code
        return f"vLLM's platform is unknown ({exc})"
    return None


def zero_new_kv_blocks() -> bool:
    """Have vLLM zero every newly allocated KV-cache block on CPU; False (and a log line) when not done."""
    if not settings().kv_zeroing:
        log.warning("adapterhub: KV-cache blocks are reused without zeroing (%s=0)", KV_ZEROING_SWITCH)
        return False
    reason = _supported()
    if reason is None:
        try:
            from vllm.v1.kv_cache_interface import KVCacheConfig
            from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        except Exception as exc:
            reason = f"vLLM's modules have another layout ({exc})"
        else:
            prop = KVCacheConfig.__dict__.get("needs_kv_cache_zeroing")
            if getattr(prop, "fget", None) is not None and getattr(prop.fget, "_adapterhub", False):
                return True  # already made (vLLM may load plugins more than once per process)
            if not isinstance(prop, property) or "_zero_block_ids" not in CPUModelRunner.__dict__:
                reason = "vLLM has no CPU zeroing of new KV blocks in this shape"
    if reason is not None:
        log.info("adapterhub: new KV-cache blocks are not zeroed: %s", reason)
        return False

    def always(self: Any) -> bool:
        return True

    always._adapterhub = True  # type: ignore[attr-defined]
    KVCacheConfig.needs_kv_cache_zeroing = property(always)  # type: ignore[method-assign, assignment]
    # The GPU runner's `_init_kv_zero_meta` builds a Triton zeroer; the CPU runner's own
    # `_zero_block_ids` (a plain `zero_()` per block and layer) needs none.
    CPUModelRunner._init_kv_zero_meta = lambda self: None  # type: ignore[method-assign]
    log.info("adapterhub: new KV-cache blocks are zeroed (%s=0 turns it off)", KV_ZEROING_SWITCH)
    return True


def non_finite_parts(lora: Any) -> list[str]:
    """Names of the modules of a vLLM `LoRAModel` whose weights or scaling hold NaN or Inf."""
    import math

    import torch

    bad = []
    for name, layer in lora.loras.items():
        tensors = [layer.lora_a, layer.lora_b]
        tensors = [t for x in tensors for t in (x if isinstance(x, list | tuple) else [x])]
        scalings = layer.scaling if isinstance(layer.scaling, list | tuple) else [layer.scaling]
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors) or any(
            s is not None and not math.isfinite(float(s)) for s in scalings
        ):
            bad.append(name)
    return bad


def neutralise(lora: Any) -> list[str]:
    """Zero every LoRA weight of a vLLM `LoRAModel` that holds a non-finite value; the modules found.

    All of the adapter is zeroed, not just the bad modules: what is left of a poisoned adapter is not
    what its owner trained either.
    """
    bad = non_finite_parts(lora)
    if bad:
        for layer in lora.loras.values():
            for attr in ("lora_a", "lora_b"):
                x = getattr(layer, attr)
                for t in x if isinstance(x, list | tuple) else [x]:
                    if t is not None:
                        t.zero_()
            if isinstance(layer.scaling, list):
                layer.scaling = [0.0 if s is not None else None for s in layer.scaling]
            else:
                layer.scaling = 0.0
    return bad


def neutralise_non_finite_loras() -> bool:
    """Make vLLM's worker zero any adapter it loads with non-finite weights; False when not installed."""
    reason = _supported()
    manager = None
    if reason is None:
        try:
            from vllm.lora.worker_manager import WorkerLoRAManager as manager
        except Exception as exc:
            reason = f"vLLM's LoRA worker has another layout ({exc})"
        else:
            if not callable(manager.__dict__.get("_load_adapter")):
                reason = "vLLM's LoRA worker has no _load_adapter"
    if reason is not None or manager is None:
        log.info("adapterhub: adapters' weights are not checked when vLLM loads them: %s", reason)
        return False
    load = manager._load_adapter
    if getattr(load, "_adapterhub", False):
        return True

    def checked_load(self: Any, lora_request: Any) -> Any:
        from adapterhub_lite.display import safe

        lora = load(self, lora_request)
        bad = neutralise(lora)
        if bad:
            log.error(
                "adapterhub: adapter %s (%s) holds NaN/Inf weights in %d module(s), first %s; "
                "it is served as the base model (all its LoRA weights are zeroed)",
                safe(str(lora_request.lora_name)),
                safe(str(lora_request.lora_path)),
                len(bad),
                safe(bad[0]),
            )
        return lora

    checked_load._adapterhub = True  # type: ignore[attr-defined]
    manager._load_adapter = checked_load  # type: ignore[method-assign]
    return True


def install() -> dict[str, bool]:
    """Both patches (idempotent); which were made."""
    return {"kv_zeroing": zero_new_kv_blocks(), "lora_values": neutralise_non_finite_loras()}
