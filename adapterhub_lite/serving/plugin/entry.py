"""The `vllm.general_plugins` entry point: registers the adapterhub LoRA resolver in vLLM.

vLLM calls `register()` in each of its processes (API server, engine core, workers). Only the API
server consults resolvers, and registering there is cheap (nothing is opened until the first adapter
is resolved); the model runs in the others, where the CPU build gets grouped LoRA ops
(`kernels/cpu_lora_ops.py`). Under adapter churn the worker loads and frees adapter weights by the thousand:
in every process the C heap returns large freed blocks to the OS (training/allocator.py), and the
worker trims the heap after each LoRA load and unload (`ADAPTERHUB_HEAP_TRIM=0` turns that off;
benchmarks/soak_bench.py measures the RSS slope with and without); adapter files are read without
safetensors' `get_tensor`, which keeps a little memory per tensor for good (vllm_compat/memory.py).
vLLM's `vllm:lora_requests_info` metric keeps only its current sample. One request's NaN/Inf never
reaches another's (`vllm_compat/isolation.py`: new KV blocks are zeroed, adapters with non-finite
weights made inert). A folder handed to vLLM stays in the disk cache until vLLM reports it read
(`vllm_compat/lora_handoff.py`). When a launcher started vLLM, the API server stops itself if that
launcher dies without stopping it (`parent_watch.py`).
"""

from __future__ import annotations

import logging

RESOLVER_NAME = "adapterhub"


def _log_to_stderr() -> None:
    """adapterhub's INFO lines (warm-up, unloads) go where vLLM's own go: the server's output."""
    logger = logging.getLogger("adapterhub")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def register() -> None:
    """Register the resolver and the CPU LoRA ops (idempotent: vLLM may call this more than once)."""
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.plugin.parent_watch import watch_parent
    from adapterhub_lite.serving.plugin.resolver import get_resolver
    from adapterhub_lite.training.allocator import return_large_blocks_to_os
    from adapterhub_lite.vllm_compat import isolation
    from adapterhub_lite.vllm_compat.lora_handoff import report_lora_reads
    from adapterhub_lite.vllm_compat.memory import install_lora_file_reader, probe_from_env
    from adapterhub_lite.vllm_compat.server import (
        bound_lora_info_metric,
        register_resolver,
        trim_heap_after_lora_changes,
    )

    _log_to_stderr()
    watch_parent()  # in the API server only: stop vLLM if its launcher is killed outright
    return_large_blocks_to_os()
    register_resolver(RESOLVER_NAME, get_resolver())
    report_lora_reads(get_resolver().handed_over)  # in the API server only
    bound_lora_info_metric()
    if ServingConfig.from_env().heap_trim:
        trim_heap_after_lora_changes()
    install_lora_file_reader()
    probe_from_env()  # a diagnostic, off unless ADAPTERHUB_MEMORY_PROBE is set
    try:
        from adapterhub_lite.vllm_compat import lora_ops
    except Exception as exc:  # another vLLM version: the seam refuses it, vLLM's own ops stay
        log = logging.getLogger("adapterhub.serving")
        log.info("adapterhub: vLLM's CPU LoRA code left as it is (%s)", exc)
    else:
        lora_ops.install()
    isolation.install()
