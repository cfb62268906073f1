"""Keep only the hot set of adapters loaded in vLLM.

vLLM never forgets a runtime-loaded adapter by itself: its API server keeps every name, and the worker
keeps up to `--max-cpu-loras` weights. With hundreds of tenants that grows without bound, so this
unloads the least recently used adapters beyond `capacity`, and any adapter idle for `idle_seconds`.
An adapter with requests in flight is never unloaded; a request for an unloaded adapter simply
resolves it again (from the disk cache).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from typing import Any

logger = logging.getLogger("adapterhub.serving")


class Evictor:
    """Tracks use and in-flight requests per adapter and unloads cold ones from vLLM."""

    def __init__(self, capacity: int, idle_seconds: float) -> None:
        self.capacity = max(1, capacity)
        self.idle_seconds = idle_seconds
        self.last_used: OrderedDict[str, float] = OrderedDict()
        self.in_flight: Counter[str] = Counter()

    def begin(self, name: str) -> None:
        """A request for adapter `name` starts."""
        self.in_flight[name] += 1
        self.last_used[name] = time.monotonic()
        self.last_used.move_to_end(name)

    def end(self, name: str) -> None:
        """A request for adapter `name` finished (whatever its outcome)."""
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
        self.last_used[name] = time.monotonic()
        self.last_used.move_to_end(name)

    def victims(self, loaded: list[str]) -> list[str]:
        """Loaded adapters to unload now: idle ones, then the least recently used beyond capacity."""
        now = time.monotonic()
        # Adapters vLLM holds that we never saw (loaded by an admin) count as used now.
        for name in loaded:
            if name not in self.last_used:
                self.last_used[name] = now
        loaded_set = set(loaded)
        order = [n for n in self.last_used if n in loaded_set]  # least recently used first
        out = [n for n in order if now - self.last_used[n] > self.idle_seconds and not self.in_flight[n]]
        remaining = [n for n in order if n not in out]
        excess = len(remaining) - self.capacity
        for name in remaining:
            if excess <= 0:
                break
            if not self.in_flight[name]:
                out.append(name)
                excess -= 1
        return out

    async def enforce(self, serving_models: Any, on_evict: Any = None) -> list[str]:
        """Unload the victims from vLLM's API server and engine; returns their names."""
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        evicted = []
        for name in self.victims(list(serving_models.lora_requests)):
            request = serving_models.lora_requests.get(name)
            if request is None or self.in_flight[name]:
                continue
            result = await serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            if isinstance(result, str):
                # The API server's unload only forgets the name; free the engine's copy too.
                await serving_models.engine_client.remove_lora(request.lora_int_id)
                self.last_used.pop(name, None)
                evicted.append(name)
                if on_evict is not None:
                    on_evict(name)
                logger.info("adapterhub: evicted cold adapter %s", name)
        return evicted
