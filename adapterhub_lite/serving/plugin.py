"""The `vllm.general_plugins` entry point: registers the adapterhub LoRA resolver in vLLM.

vLLM calls `register()` in each of its processes; only the API server consults resolvers, and
registering there is cheap (nothing is opened until the first adapter is resolved).
"""

from __future__ import annotations

RESOLVER_NAME = "adapterhub"


def register() -> None:
    """Register the resolver (idempotent: vLLM may call this more than once per process)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    from adapterhub_lite.serving.resolver import get_resolver

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, get_resolver())
