"""Prefetch: when an alias moves (`adapterhub tenant promote`, a rollout's end, from any process), the
version it now names is pulled and verified into the disk cache before the alias's first request.

The gateway watches the tenant store's change probe (the same cheap probe every request asks) every
`ADAPTERHUB_PREFETCH_SECONDS`; after a change it compares every alias's target with what it saw before
and queues the references that are new. One worker thread fetches them in order (the resolver's own
`fetch`: the registry pull, the verification, the bounded disk cache), so a prefetch never takes more
than one thread, and a request for the same reference meanwhile waits on the resolver's per-reference
lock instead of pulling twice. Bounded: at most `MAX_QUEUED` references wait (the newest win: an older
promote is more likely superseded), the set of targets seen is the store's own aliases, and a
reference that failed is tried again only when an alias moves to it again. Targets present when the
server starts are not prefetched: the disk cache bounds what fits, and the first request fetches them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping

from adapterhub_lite.display import safe
from adapterhub_lite.errors import AdapterHubError

logger = logging.getLogger("adapterhub.serving")

MAX_QUEUED = 64


class Prefetcher:
    """Queue the references aliases newly point at, and fetch them one at a time off the event loop."""

    def __init__(self, fetch: Callable[[str], object], max_queued: int = MAX_QUEUED) -> None:
        self._fetch = fetch
        self._targets: set[str] | None = None  # None until the first look: nothing is prefetched at start
        self._queue: deque[str] = deque(maxlen=max_queued)
        self._wake = asyncio.Event()
        self.fetched: deque[str] = deque(maxlen=max_queued)  # the latest done, newest last (admin status)
        self.failed: deque[tuple[str, str]] = deque(maxlen=max_queued)  # (ref, why), newest last

    def saw(self, aliases: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Compare the store's aliases (tenant -> alias -> ref) with the last look; queue and return the
        references no alias named before."""
        targets = {ref for per_tenant in aliases.values() for ref in per_tenant.values()}
        new = [] if self._targets is None else sorted(targets - self._targets)
        self._targets = targets
        for ref in new:
            if ref not in self._queue:
                self._queue.append(ref)
        if new:
            self._wake.set()
        return new

    def pending(self) -> list[str]:
        return list(self._queue)

    async def run(self) -> None:
        """Fetch what is queued, one reference at a time, until cancelled; a failed fetch, expected or
        not, is recorded and logged, and the next one goes on."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                ref = self._queue.popleft()
                try:
                    await asyncio.to_thread(self._fetch, ref)
                except AdapterHubError as exc:  # its first request will say the same to its caller
                    logger.warning("adapterhub: prefetch of %s failed: %s", safe(ref), safe(exc.message))
                    self.failed.append((ref, exc.message))
                    continue
                except Exception as exc:  # a bug: say it, keep prefetching the rest
                    logger.exception("adapterhub: prefetch of %s failed", safe(ref))
                    self.failed.append((ref, type(exc).__name__))
                    continue
                self.fetched.append(ref)
