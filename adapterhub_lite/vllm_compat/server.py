"""What adapterhub reads and does inside vLLM's API server process (vLLM 0.32).

- `Engine`: the served model names and the LoRA adapters vLLM holds (`app.state.openai_serving_models`:
  `.base_model_paths`, `.lora_requests`), and unloading one from both the API server and the engine
  (`unload_lora_adapter` only forgets the name; `engine_client.remove_lora` frees the weights);
- `lora_request`, `LoRAResolver`, `register_resolver`: vLLM's resolver hook;
- `bound_lora_info_metric`: `vllm:lora_requests_info` keeps only its current sample.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

logger = logging.getLogger("adapterhub.serving")

LORA_INFO_METRIC = "vllm:lora_requests_info"


class Engine:
    """vLLM's model and adapter state, as the API server holds it."""

    def __init__(self, serving_models: Any) -> None:
        self._models = serving_models

    @classmethod
    def from_scope(cls, scope: MutableMapping[str, Any]) -> Engine | None:
        """The engine behind the ASGI app of `scope`, or None before vLLM has set its state up."""
        state = getattr(scope.get("app"), "state", None)
        models = getattr(state, "openai_serving_models", None)
        return None if models is None else cls(models)

    def base_names(self) -> set[str]:
        """Names the base model is served under (--served-model-name)."""
        return {m.name for m in self._models.base_model_paths}

    def loaded(self) -> list[str]:
        """Names of the LoRA adapters the API server holds (a snapshot: safe to iterate)."""
        return list(self._models.lora_requests)

    def is_loaded(self, name: str) -> bool:
        return name in self._models.lora_requests

    async def unload(self, name: str) -> bool:
        """Unload `name` from the API server and free its weights in the engine; False if not loaded."""
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        request = self._models.lora_requests.get(name)
        if request is None:
            return False
        result = await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if not isinstance(result, str):  # an ErrorResponse: someone else unloaded it meanwhile
            return False
        await self._models.engine_client.remove_lora(request.lora_int_id)
        # vLLM keeps one asyncio.Lock per adapter name ever seen; drop ours once it is free.
        locks = getattr(self._models, "lora_resolver_lock", None)
        lock = locks.get(name) if isinstance(locks, dict) else None
        if lock is not None and not lock.locked():
            locks.pop(name, None)
        return True


def lora_request(name: str, path: str) -> Any:
    """A vLLM LoRARequest for the PEFT directory `path` (vLLM replaces the id with one of its own)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=1, lora_path=path)


def resolver_base() -> type:
    """vLLM's LoRAResolver base class."""
    from vllm.lora.resolver import LoRAResolver

    return LoRAResolver


def register_resolver(name: str, resolver: Any) -> None:
    """Register `resolver` with vLLM under `name` (idempotent)."""
    from vllm.lora.resolver import LoRAResolverRegistry

    if name not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(name, resolver)


class _LatestOnly:
    """A labelled gauge that keeps only the label set set last: every new combination of running and
    waiting adapters would otherwise stay exposed (and in memory) forever."""

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge
        self._last: tuple | None = None

    def labels(self, *args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        if key != self._last:
            self._gauge.clear()
            self._last = key
        return self._gauge.labels(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gauge, name)


def latest_only(gauge: Any) -> Any:
    """`gauge` wrapped so that it exposes only its most recent label set."""
    return gauge if isinstance(gauge, _LatestOnly) else _LatestOnly(gauge)


def bound_lora_info_metric() -> None:
    """Make vLLM's Prometheus stat logger keep only the current `vllm:lora_requests_info` sample.

    The Gateway API inference extension's endpoint picker reads the sample with the newest value (its
    `running_lora_adapters` / `waiting_lora_adapters` labels), so the current one is all it needs.
    Installed by the plugin before vLLM builds its stat loggers; idempotent.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    init = PrometheusStatLogger.__init__
    if getattr(init, "_adapterhub", False):
        return

    def bounded_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if getattr(self, "gauge_lora_info", None) is not None:
            self.gauge_lora_info = latest_only(self.gauge_lora_info)

    bounded_init._adapterhub = True  # type: ignore[attr-defined]
    PrometheusStatLogger.__init__ = bounded_init


def trim_heap_after_lora_changes() -> bool:
    """In vLLM's worker: give the C heap's free pages back to the OS after each LoRA load and unload.

    Adapter weights are small allocations (below any mmap threshold) made and freed by the hundred
    under churn; glibc keeps the freed pages in its arenas, so RSS only rises. `malloc_trim(0)` after
    each change returns them (milliseconds; loads are rare next to requests). Returns whether it was
    installed (glibc only; idempotent).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    from vllm.v1.worker.gpu_worker import Worker

    if getattr(Worker.remove_lora, "_adapterhub", False):
        return True

    def trimmed(method: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            finally:
                trim(0)

        wrapper._adapterhub = True  # type: ignore[attr-defined]
        return wrapper

    Worker.add_lora = trimmed(Worker.add_lora)
    Worker.remove_lora = trimmed(Worker.remove_lora)
    return True
