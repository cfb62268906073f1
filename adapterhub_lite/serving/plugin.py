"""The `vllm.general_plugins` entry point: registers the adapterhub LoRA resolver in vLLM.

vLLM calls `register()` in each of its processes (API server, engine core, workers). Only the API
server consults resolvers, and registering there is cheap (nothing is opened until the first adapter
is resolved); the model runs in the others, where the CPU build gets grouped LoRA ops
(`cpu_lora_ops.py`).
"""

from __future__ import annotations

RESOLVER_NAME = "adapterhub"


def register() -> None:
    """Register the resolver and the CPU LoRA ops (idempotent: vLLM may call this more than once)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from adapterhub_lite.serving import cpu_lora_ops
    from adapterhub_lite.serving.resolver import get_resolver

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, get_resolver())
    cpu_lora_ops.install()
