"""Per-tenant rate limits shared by every replica: one token bucket per tenant and kind in Redis.

The buckets behave exactly like the in-process `RateLimiter` (a minute's allowance, continuous refill,
tokens charged when a request finishes), but live in Redis and are read and updated by one server-side
Lua script per call, so two replicas admitting the same tenant at the same instant cannot both take the
last request: a limit of N a minute is N across the whole fleet. Time comes from the Redis server
(`TIME`), so replicas with skewed clocks agree. A bucket idle for two minutes has refilled completely;
it is allowed to expire then, which keeps Redis's memory bounded under tenant churn at no loss.

When Redis cannot be reached the limiter fails the way it was configured: `open` (the default, as
Envoy's rate-limit filter does) admits and logs once per outage; `closed` refuses with UNAVAILABLE and
`Retry-After`, which the HTTP layer answers with 503.
"""

from __future__ import annotations

import logging
import math
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from adapterhub_lite.errors import ErrorKind, ServingError

log = logging.getLogger(__name__)

FailureMode = Literal["open", "closed"]
SCHEMES = ("redis", "rediss", "unix")
_IDLE_EXPIRY_S = 120  # > the 60 s a bucket needs to refill completely
_RETRY_AFTER_S = 5.0

# KEYS: request bucket, token bucket. ARGV: requests/min (0 = no limit), tokens/min (0 = no limit).
# Returns the seconds to wait as a string (Lua numbers are truncated to integers on the way out).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level_of(key, cap)
  if cap <= 0 then return nil end
  local v = redis.call('HMGET', key, 'level', 'stamp', 'cap')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil or tonumber(v[3]) ~= cap then return cap end
  return math.min(cap, level + (now - stamp) * cap / 60.0)
end
local function store(key, level, cap)
  redis.call('HSET', key, 'level', level, 'stamp', now, 'cap', cap)
  redis.call('EXPIRE', key, tonumber(ARGV[3]))
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local req, tok = level_of(KEYS[1], rpm), level_of(KEYS[2], tpm)
local wait = 0
if req ~= nil and req < 1 then wait = math.max(wait, (1 - req) * 60.0 / rpm) end
if tok ~= nil and tok <= 0 then wait = math.max(wait, (0.001 - tok) * 60.0 / tpm) end
if wait <= 0 and req ~= nil then req = req - 1 end
if req ~= nil then store(KEYS[1], req, rpm) end
if tok ~= nil then store(KEYS[2], tok, tpm) end
return tostring(wait)
"""

# KEYS: token bucket. ARGV: tokens/min, tokens used, expiry.
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'level', 'stamp', 'cap')
local level, stamp = tonumber(v[1]), tonumber(v[2])
if level == nil or tonumber(v[3]) ~= cap then level = cap
else level = math.min(cap, level + (now - stamp) * cap / 60.0) end
redis.call('HSET', KEYS[1], 'level', level - used, 'stamp', now, 'cap', cap)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def redact(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class SharedRateLimiter:
    """Token buckets keyed by tenant, in Redis; the same contract as `RateLimiter`, awaited."""

    def __init__(self, url: str, *, failure: FailureMode = "open", prefix: str = "adapterhub:rl:") -> None:
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise ServingError(
                f"rate-limit store {redact(url)!r}: unsupported scheme {scheme!r}",
                hint=f"use one of {', '.join(s + '://' for s in SCHEMES)} (or no URL for in-process limits)",
                kind=ErrorKind.INVALID,
            )
        if failure not in ("open", "closed"):
            raise ServingError(
                f"rate-limit failure mode {failure!r} is not 'open' or 'closed'", kind=ErrorKind.INVALID
            )
        import redis.asyncio as aioredis

        self.url, self.failure, self._prefix = url, failure, prefix
        self._redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._admit = self._redis.register_script(_ADMIT)
        self._charge = self._redis.register_script(_CHARGE)
        self._outage = False

    async def check(self) -> None:
        """Fail with one line naming the URL when Redis cannot be reached (called at server start)."""
        import redis.exceptions

        try:
            await self._redis.ping()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise ServingError(
                f"cannot reach the rate-limit store at {redact(self.url)}: {exc}",
                hint="check that redis-server is running there and the URL's host, port and password",
                kind=ErrorKind.UNAVAILABLE,
            ) from None

    def _keys(self, tenant: str) -> tuple[str, str]:
        return f"{self._prefix}{tenant}:req", f"{self._prefix}{tenant}:tok"

    def _unreachable(self, exc: Exception) -> None:
        if not self._outage:
            self._outage = True
            log.warning(
                "rate-limit store %s unreachable (%s); failing %s until it is back",
                redact(self.url),
                type(exc).__name__,
                self.failure,
            )
        if self.failure == "closed":
            raise ServingError(
                "rate limits are unavailable (the shared rate-limit store cannot be reached)",
                hint="retry shortly; the operator should check redis-server",
                kind=ErrorKind.UNAVAILABLE,
                retry_after=_RETRY_AFTER_S,
            ) from None

    async def admit(self, tenant: str, rpm: int | None, tpm: int | None) -> float | None:
        """Take one request from the tenant's fleet-wide allowance; None if admitted, else seconds to wait."""
        import redis.exceptions

        if not rpm and not tpm:
            return None
        try:
            args = [rpm or 0, tpm or 0, _IDLE_EXPIRY_S]
            wait = float(await self._admit(keys=self._keys(tenant), args=args))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            self._unreachable(exc)
            return None
        if self._outage:
            self._outage = False
            log.warning("rate-limit store %s reachable again", redact(self.url))
        return max(1.0, math.ceil(wait)) if wait > 0 else None

    async def charge_tokens(self, tenant: str, tpm: int | None, tokens: int) -> None:
        """Charge the tokens a finished request used (best effort while Redis is away)."""
        import redis.exceptions

        if not tpm or tokens <= 0:
            return
        try:
            await self._charge(keys=[self._keys(tenant)[1]], args=[tpm, tokens, _IDLE_EXPIRY_S])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            try:
                self._unreachable(exc)
            except ServingError:
                pass  # the request already ran; only admission fails closed

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
