"""Per-tenant rate limits: requests and tokens per minute, as token buckets.

A bucket holds up to one minute's allowance and refills continuously, so a tenant may burst up to its
limit and then proceeds at the steady rate. Requests are admitted while both buckets are positive; the
tokens a request really used are charged when it finishes (its length is not known before), so a
tenant can overshoot by one request and then waits it off. `Retry-After` is the time until both
buckets are positive again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterhub_lite.serving.gateway.shared_ratelimit import SharedRateLimiter


@dataclass
class _Bucket:
    capacity: float
    level: float
    stamp: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def seconds_until_positive(self) -> float:
        return 0.0 if self.level > 0 else (1e-3 - self.level) * 60.0 / self.capacity


class RateLimiter:
    """Token buckets keyed by tenant; limits are read from the tenant record on every call."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _bucket(self, tenant: str, kind: str, limit: int, now: float) -> _Bucket:
        b = self._buckets.get((tenant, kind))
        if b is None or b.capacity != limit:
            # A changed limit starts a full bucket: the simplest rule a tenant can reason about.
            b = self._buckets[(tenant, kind)] = _Bucket(capacity=float(limit), level=float(limit), stamp=now)
        b.refill(now)
        return b

    def admit(self, tenant: str, rpm: int | None, tpm: int | None) -> float | None:
        """Take one request from the tenant's allowance; None if admitted, else seconds to wait."""
        now = time.monotonic()
        wait = 0.0
        req = self._bucket(tenant, "req", rpm, now) if rpm else None
        tok = self._bucket(tenant, "tok", tpm, now) if tpm else None
        if req is not None and req.level < 1.0:
            wait = max(wait, (1.0 - req.level) * 60.0 / req.capacity)
        if tok is not None:
            wait = max(wait, tok.seconds_until_positive())
        if wait > 0:
            return max(1.0, math.ceil(wait))
        if req is not None:
            req.level -= 1.0
        return None

    def charge_tokens(self, tenant: str, tpm: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used."""
        if tpm and tokens > 0:
            self._bucket(tenant, "tok", tpm, time.monotonic()).level -= tokens


class InProcessLimiter:
    """`RateLimiter` behind the awaited interface the middleware uses for both kinds of limiter."""

    def __init__(self) -> None:
        self.buckets = RateLimiter()

    async def admit(self, tenant: str, rpm: int | None, tpm: int | None) -> float | None:
        return self.buckets.admit(tenant, rpm, tpm)

    async def charge_tokens(self, tenant: str, tpm: int | None, tokens: int) -> None:
        self.buckets.charge_tokens(tenant, tpm, tokens)


def open_limiter(url: str | None, failure: str = "open") -> InProcessLimiter | SharedRateLimiter:
    """In-process token buckets without a URL; one Redis bucket per tenant for the fleet with one."""
    if not url:
        return InProcessLimiter()
    from adapterhub_lite.serving.gateway.shared_ratelimit import SharedRateLimiter

    return SharedRateLimiter(url, failure=failure)  # type: ignore[arg-type]
