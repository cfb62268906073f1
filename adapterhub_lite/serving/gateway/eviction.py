"""Keep only the hot set of adapters loaded in vLLM, as a bound that holds.

vLLM never forgets a runtime-loaded adapter by itself: its API server keeps every name, and the worker
keeps up to `--max-cpu-loras` weights. With hundreds of tenants that grows without bound, so at most
`capacity` adapters are loaded or being loaded at any time: a request for an adapter that is not loaded
first makes room (unloading the least recently used adapter with no request in flight) and only then
lets vLLM load it; when every loaded adapter is busy it waits for one to finish. Adapters idle for
`idle_seconds` are unloaded too. A request for an unloaded adapter simply resolves it again (from the
disk cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from typing import Protocol

from adapterhub_lite.errors import ErrorKind, ServingError

logger = logging.getLogger("adapterhub.serving")


class LoadedAdapters(Protocol):
    """What the evictor needs from the engine (vllm_compat.server.Engine is one)."""

    def loaded(self) -> list[str]: ...

    async def unload(self, name: str) -> bool: ...


class Evictor:
    """Tracks use, loads and in-flight requests per adapter and unloads cold ones from vLLM."""

    def __init__(self, capacity: int, idle_seconds: float, wait_seconds: float = 60.0) -> None:
        self.capacity = max(1, capacity)
        self.idle_seconds = idle_seconds
        self.wait_seconds = wait_seconds  # longest a request waits for a busy hot set
        self.last_used: OrderedDict[str, float] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.loading: set[str] = set()  # admitted, not yet seen loaded by vLLM
        self._changed: asyncio.Event | None = None

    def begin(self, name: str) -> None:
        """A request for adapter `name` starts."""
        self.in_flight[name] += 1
        self._touch(name)

    def end(self, name: str) -> None:
        """A request for adapter `name` finished (whatever its outcome)."""
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
            self.loading.discard(name)  # loaded by now, or failed to load
        self._touch(name)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _touch(self, name: str) -> None:
        self.last_used[name] = time.monotonic()
        self.last_used.move_to_end(name)

    def _lru(self, loaded: list[str]) -> list[str]:
        """`loaded`, least recently used first; adapters never seen (an admin's) count as used now."""
        now = time.monotonic()
        for name in loaded:
            if name not in self.last_used:
                self.last_used[name] = now
        held = set(loaded)
        return [n for n in self.last_used if n in held]

    def victims(self, loaded: list[str]) -> list[str]:
        """Loaded adapters to unload now: idle ones, then the least recently used beyond capacity."""
        now = time.monotonic()
        order = self._lru(loaded)
        out = [n for n in order if now - self.last_used[n] > self.idle_seconds and not self.in_flight[n]]
        remaining = [n for n in order if n not in out]
        excess = len(remaining) + len(self.loading - set(loaded)) - self.capacity
        for name in remaining:
            if excess <= 0:
                break
            if not self.in_flight[name]:
                out.append(name)
                excess -= 1
        return out

    async def make_room(self, engine: LoadedAdapters, name: str) -> list[str]:
        """Before a request for `name` (already begun) goes to vLLM: unload until `name` fits in the hot
        set, counting adapters being loaded; returns what was unloaded.

        Raises ServingError (unavailable) when every slot stays busy for `wait_seconds`.
        """
        evicted: list[str] = []
        deadline = time.monotonic() + self.wait_seconds
        while True:
            loaded = engine.loaded()
            if name in loaded or name in self.loading:
                return evicted
            pending = self.loading - set(loaded)
            if len(loaded) + len(pending) < self.capacity:
                self.loading.add(name)
                return evicted
            idle = [n for n in self._lru(loaded) if not self.in_flight[n]]
            if idle:
                if await self._unload(engine, idle[0]):
                    evicted.append(idle[0])
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServingError(
                    f"all {self.capacity} adapter slots are busy",
                    hint="retry shortly, or raise --max-loaded",
                    kind=ErrorKind.UNAVAILABLE,
                    retry_after=1,
                )
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                pass

    async def enforce(self, engine: LoadedAdapters) -> list[str]:
        """Unload the idle adapters and any beyond capacity; returns their names."""
        evicted = []
        loaded = engine.loaded()
        held = set(loaded) | self.loading | set(self.in_flight)
        for name in [n for n in self.last_used if n not in held]:  # names from clients: keep bounded
            del self.last_used[name]
        for name in self.victims(loaded):
            if not self.in_flight[name] and await self._unload(engine, name):
                evicted.append(name)
        return evicted

    async def evict(self, engine: LoadedAdapters, name: str) -> bool:
        """Unload `name` now (an admin's request). False if not loaded; ServingError if in use."""
        if self.in_flight[name]:
            raise ServingError(f"adapter {name} has requests in flight", kind=ErrorKind.CONFLICT)
        return await self._unload(engine, name)

    async def _unload(self, engine: LoadedAdapters, name: str) -> bool:
        if not await engine.unload(name):
            return False
        self.last_used.pop(name, None)
        logger.info("adapterhub: unloaded adapter %s", name)
        return True
