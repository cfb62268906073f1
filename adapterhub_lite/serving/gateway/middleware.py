"""Tenancy inside vLLM's own API server: an ASGI middleware given to vLLM with `--middleware`.

For every HTTP request it
- authenticates the `Authorization: Bearer` key: the admin key, or a tenant's key (else 401);
- lets a tenant reach only `/v1/completions`, `/v1/chat/completions` and `/v1/models` (else 403);
  load/unload, `/adapterhub/v1/*` management routes (admin.py) and everything else are admin-only;
- resolves the request's `model` in the tenant's view (alias -> immutable full reference); outside the
  view the answer is the same 404 whether or not the model exists elsewhere;
- applies the tenant's rate limits (429 with Retry-After);
- verifies (and caches) the bundle before vLLM sees its name, so a bad bundle gets a clear 422 and is
  never loaded; other failures answer by their kind (a locked registry 503 with Retry-After);
- makes room in the hot set before vLLM loads a new adapter (eviction.py), then rewrites `model` to
  the full reference and passes the request on (forwarding.py);
- holds `/health` at 503 until a warm-up request has gone through a LoRA slot (warmup.py);
- with an OTLP endpoint set, traces each request, a span per step above (tracing.py).

Why middleware and not a `vllm.endpoint_plugins` plugin: an endpoint plugin can only add routes, while
tenancy has to see, refuse or rewrite every request before vLLM's own routes do; `--middleware` is the
hook vLLM offers for that, and it keeps the user's own vLLM command line working.

Alias moves made by `adapterhub tenant promote` in another process are seen by the very next request:
the store is probed for a changed data version (cheap) and re-read only when it changed. A polled cache
with a TTL would serve the old version for up to a TTL after a promote; an admin "reload" route would
need the CLI to know every server. The promote -> first-token time is measured by
benchmarks/serving_bench.py (hot_swap_s).

While the tenant store cannot be reached (on PostgreSQL: its change feed lost its connection) every
tenant request is answered 503 with Retry-After, even one whose tenant and adapter are already in
memory. Serving those from memory would ride out a short outage, but "this replica cannot reach the
database" includes a network partition during which `adapterhub tenant revoke` succeeds from another
machine: a revoked key would keep working for as long as the partition lasts, with no bound. Failing
closed bounds it by the time the feed takes to notice (its poll, or the TCP timeouts in db/engine.py).
A registry that cannot answer is a 503 too, never a "does not exist" (view.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from adapterhub_lite import keys
from adapterhub_lite.display import safe
from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.serving import tracing
from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.gateway import warmup
from adapterhub_lite.serving.gateway.admin import ADMIN_PREFIX, admin_route
from adapterhub_lite.serving.gateway.admin_load import LOAD_LORA_PATH, admin_load_lora
from adapterhub_lite.serving.gateway.asgi import (
    App,
    BodyRefused,
    Message,
    Receive,
    Scope,
    Send,
    bearer,
    read_body,
    send_error,
    send_json,
    send_project_error,
)
from adapterhub_lite.serving.gateway.eviction import Evictor
from adapterhub_lite.serving.gateway.forwarding import forward
from adapterhub_lite.serving.gateway.ledger import UsageLedger, open_ledger
from adapterhub_lite.serving.gateway.metrics import ServingMetrics, default_metrics
from adapterhub_lite.serving.gateway.openai_request import RequestRefused, parse_request
from adapterhub_lite.serving.gateway.prefetch import Prefetcher
from adapterhub_lite.serving.gateway.ratelimit import open_limiter
from adapterhub_lite.serving.gateway.rollout_router import RolloutRouter
from adapterhub_lite.serving.gateway.tenant_cache import TenantCache
from adapterhub_lite.serving.gateway.usage import ask_for_stream_usage
from adapterhub_lite.tenants.store import Tenant, TenantStore
from adapterhub_lite.tenants.view import CachedRegistry, Target, resolve_model
from adapterhub_lite.vllm_compat.server import Engine

if TYPE_CHECKING:
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver

logger = logging.getLogger("adapterhub.serving")

PUBLIC_PATHS = {"/health", "/ping", "/version"}
HEALTH_PATHS = {"/health", "/ping"}
INFERENCE_PATHS = {"/v1/completions", "/v1/chat/completions"}
MODELS_PATH = "/v1/models"
UNTRACED = PUBLIC_PATHS | {"/metrics"}  # health checks and scrapes would bury the requests' traces
_AUTH_HEADERS = [(b"www-authenticate", b"Bearer")]
_OUTAGE_LOG_EVERY_S = 10.0


class TenancyMiddleware:
    """ASGI middleware; vLLM constructs it as `TenancyMiddleware(app)` and the rest comes from the env."""

    def __init__(
        self,
        app: App,
        config: ServingConfig | None = None,
        store: TenantStore | None = None,
        resolver: AdapterResolver | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.app = app
        self.config = config or ServingConfig.from_env()
        if not self.config.admin_key:
            logger.warning("adapterhub: the admin key is not set; admin routes are closed to everyone")
        self._admin_key = self.config.admin_key.encode() if self.config.admin_key else None
        self.store = store or TenantStore.open(self.config.tenants_db)
        if resolver is None:
            from adapterhub_lite.serving.plugin.resolver import get_resolver  # imports vLLM

            resolver = get_resolver()
        self.resolver = resolver
        self.metrics = metrics or default_metrics()
        if (cache := getattr(self.resolver, "cache", None)) is not None:  # stand-ins in tests have none
            self.metrics.track_cache(cache)
        self.limiter = open_limiter(self.config.rate_limit_url, self.config.rate_limit_failure)
        self.evictor = Evictor(self.config.hot_set_size(), self.config.idle_seconds)
        self.ready = not self.config.warmup
        self.tenants = TenantCache(self.store)
        self.ledger = open_ledger(self.store.db)  # the usage ledger (ledger.py); None when turned off
        self.rollouts = RolloutRouter(self.store)  # rollout: canary split + live gate (rollout_router.py)
        self.tracing = tracing.open_tracing(self.config.otlp_endpoint, self.config.otlp_sample_ratio)
        self._registry: CachedRegistry | None = None
        self._background: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.prefetcher = Prefetcher(lambda ref: self.resolver.fetch(ref))  # moved aliases (prefetch.py)
        self._watcher: asyncio.Task | None = None
        self._outage_logged = -_OUTAGE_LOG_EVERY_S

    # -- state -------------------------------------------------------------------------------------

    @property
    def registry(self) -> CachedRegistry:
        if self._registry is None:
            self._registry = CachedRegistry(lambda: self.resolver.registry)
        return self._registry

    @property
    def tenants_version(self) -> int:
        return self.tenants.version

    def refresh(self, force: bool = False) -> int:
        """Re-read tenants and aliases if the store changed (always with `force`); the store's version."""
        if force and self._registry is not None:
            self._registry.clear()
        return self.tenants.refresh(force)

    def _base_names(self, engine: Engine | None) -> set[str]:
        names = engine.base_names() if engine is not None else set()
        if self.config.served_name:
            names.add(self.config.served_name)
        return names

    # -- ASGI --------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tracing is None or scope["type"] != "http" or scope["path"] in UNTRACED:
            await self._handle(scope, receive, send)
            return
        async with self.tracing.request(scope, send) as traced_send:  # spans: tracing.py
            await self._handle(scope, receive, traced_send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(scope, send))
            return
        if scope["type"] != "http":
            # WebSockets (realtime audio) carry no tenant model mapping: closed to tenants.
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS:
            if path in HEALTH_PATHS and not self.ready:
                await send_json(send, 503, {"status": "warming up"}, [(b"retry-after", b"1")])
            else:
                await self.app(scope, receive, send)
            return
        self._ensure_sweeper(scope)
        self._ensure_watcher()
        self.rollouts.ensure_scheduler(scope, self.config.admin_key)  # steps on a schedule
        if self.ledger is not None and path in INFERENCE_PATHS:
            send = self.ledger.watch(scope, send)  # every answered inference request: one ledger row
        tracing.phase("authenticate")
        key = bearer(scope)
        if key is None:
            self.metrics.rejected.labels("", "no_key").inc()
            await send_error(
                send,
                401,
                "missing API key: send `Authorization: Bearer <key>`",
                "AuthenticationError",
                headers=_AUTH_HEADERS,
            )
            return
        if self._admin_key is not None and keys.same(key.encode("latin-1"), self._admin_key):
            tracing.note_request(tenant="admin")
            if path.startswith(ADMIN_PREFIX):
                await admin_route(self, scope, receive, send)
            elif path in INFERENCE_PATHS and scope["method"] == "POST":
                await self._inference(scope, receive, send, tenant=None)
            elif path == LOAD_LORA_PATH and scope["method"] == "POST":
                await admin_load_lora(self, scope, receive, send)  # a raw directory: checked first
            else:
                await self.app(scope, receive, send)
            return
        try:
            self.refresh()
            tenant = self.tenants.cached(key)
            if tenant is None:  # a database call: off the event loop, a slow database holds this request only
                tenant = await asyncio.to_thread(self.tenants.tenant, key)
        except AdapterHubError as exc:  # the tenant store is unreachable (a stopped database): 503, not 500
            self.metrics.rejected.labels("", "store_unavailable").inc()
            self._log_outage(exc)
            await send_project_error(send, exc, "the tenant store is unavailable; retry later")
            return
        if tenant is None:
            self.metrics.rejected.labels("", "bad_key").inc()
            await send_error(
                send, 401, "invalid or revoked API key", "AuthenticationError", headers=_AUTH_HEADERS
            )
            return
        tracing.note_request(tenant=tenant.name)
        if path == MODELS_PATH and scope["method"] == "GET":
            await self._list_models(scope, send, tenant)
        elif path in INFERENCE_PATHS and scope["method"] == "POST":
            await self._inference(scope, receive, send, tenant=tenant)
        else:
            self.metrics.rejected.labels(tenant.name, "admin_route").inc()
            await send_error(send, 403, f"{path} needs the admin key", "PermissionDeniedError")

    def _log_outage(self, exc: AdapterHubError) -> None:
        """Log a store or registry failure (which names the database, so tenants are not told it),
        at most once every few seconds however many requests meet it."""
        now = time.monotonic()
        if now - self._outage_logged >= _OUTAGE_LOG_EVERY_S:
            self._outage_logged = now
            logger.warning("adapterhub: answering 503: %s", exc.message)

    # -- tenant routes -----------------------------------------------------------------------------

    async def _list_models(self, scope: Scope, send: Send, tenant: Tenant) -> None:
        now = int(time.time())
        data = []
        if tenant.base_access:
            for name in sorted(self._base_names(Engine.from_scope(scope))):
                data.append({"id": name, "object": "model", "created": now, "owned_by": "adapterhub"})
        for alias, ref in sorted(self.tenants.aliases(tenant.name).items()):
            data.append(
                {"id": alias, "object": "model", "created": now, "owned_by": tenant.namespace, "root": ref}
            )
        # Then every adapter the tenant may name as `namespace/name` (own, shared, public) for this base.
        # The first call hashes the base's weights: off the event loop.
        fingerprint = await asyncio.to_thread(self._served_fingerprint)
        try:
            readable = self.registry.readable(tenant.namespace, fingerprint)
        except AdapterHubError as exc:
            self._log_outage(exc)
            await send_project_error(send, exc, "the registry is unavailable; retry later")
            return
        for package, ref in readable:
            owner = package.split("/", 1)[0]
            data.append({"id": package, "object": "model", "created": now, "owned_by": owner, "root": ref})
        await send_json(send, 200, {"object": "list", "data": data})

    def _served_fingerprint(self) -> str | None:
        """The served base's fingerprint, or None (no filter) where the server was not told its base."""
        try:
            return self.resolver.base_fingerprint()
        except AdapterHubError:
            return None

    async def _inference(self, scope: Scope, receive: Receive, send: Send, tenant: Tenant | None) -> None:
        label = tenant.name if tenant else "admin"
        UsageLedger.attribute(scope, tenant=label)
        tracing.phase("read_body")
        try:  # the caller is authenticated by now: only then is the body read (bounded in size and time)
            body = await read_body(receive, scope)
            # Parsing megabytes takes a while: off the event loop, so other tenants' streams keep flowing.
            payload, fields = (
                parse_request(body)
                if len(body) < 256 * 1024
                else await asyncio.to_thread(parse_request, body)
            )
        except BodyRefused as exc:
            self.metrics.rejected.labels(label, f"body_{exc.status}").inc()
            await send_error(send, exc.status, exc.message, "BadRequestError")
            return
        except RequestRefused as exc:
            self.metrics.rejected.labels(label, "bad_request").inc()
            await send_error(send, 400, str(exc), "BadRequestError")
            return
        model = fields.model

        engine = Engine.from_scope(scope)
        tracing.phase("resolve")
        try:
            if tenant is None:
                target = self._admin_target(engine, model)
            else:
                # Inline: aliases are in memory and registry answers are memoized (a miss is one read).
                target = resolve_model(
                    model, tenant, self.tenants.aliases(tenant.name), self._base_names(engine), self.registry
                )
        except AdapterHubError as exc:  # the registry cannot answer (a stopped database): 503, not 404
            self.metrics.rejected.labels(label, "registry_unavailable").inc()
            self._log_outage(exc)
            await send_project_error(send, exc, "the registry is unavailable; retry later")
            return
        if target is None:
            self.metrics.rejected.labels(label, "unknown_model").inc()
            await send_error(
                send, 404, f"The model `{model}` does not exist.", "NotFoundError", param="model"
            )
            return

        UsageLedger.attribute(scope, alias=model, ref=target.name if target.managed else "")
        tracing.note_request(alias=model, ref=target.name)
        if tenant is not None:
            tracing.phase("rate_limit")
            try:
                rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
                wait = await self.limiter.admit(tenant.name, rpm, tpm)
            except AdapterHubError as exc:  # shared limits configured to fail closed, and Redis is away
                self.metrics.rejected.labels(label, "limits_unavailable").inc()
                await send_project_error(send, exc, exc.message)
                return
            if wait is not None:
                self.metrics.rejected.labels(label, "rate_limited").inc()
                await send_error(
                    send,
                    429,
                    f"rate limit exceeded; retry in {int(wait)} s",
                    "RateLimitError",
                    headers=[(b"retry-after", str(int(wait)).encode())],
                )
                return

        # rollout: resolve an alias under rollout once per request; name the answering ref in a header
        who = tenant.name if tenant else None
        target, rollout = await self.rollouts.route_fresh(who, model, target, payload, scope["headers"])
        send = self.rollouts.observe(send, target, rollout)
        if rollout is not None:  # the ledger names the version that answers, not the one first resolved
            UsageLedger.attribute(scope, ref=target.name if target.managed else "")
            tracing.note_request(ref=target.name)
        if target.managed:
            self.evictor.begin(target.name)
        try:
            if target.managed and not await self._admit_adapter(engine, send, target, label):
                return
            payload["model"] = target.name
            hide_usage = ask_for_stream_usage(payload)
            tracing.phase("forward")
            tracing.propagate(scope)  # vLLM's own spans continue this trace
            prompt, completion = await forward(
                self.app,
                scope,
                receive,
                send,
                json.dumps(payload).encode(),
                metrics=self.metrics,
                tenant_label=label,
                adapter_label=target.name if target.managed else "",
                hide_usage=hide_usage,
                on_done=self.ledger.forwarded(scope) if self.ledger is not None else None,
            )
            tracing.tokens(prompt, completion)
            if tenant is not None:
                await self.limiter.charge_tokens(tenant.name, tenant.tokens_per_minute, prompt + completion)
        finally:
            if target.managed:
                self.evictor.end(target.name)

    def _admin_target(self, engine: Engine | None, model: str) -> Target | None:
        if model in self._base_names(engine):
            return Target(model, managed=False)
        full = self.registry.full_ref(model) if "/" in model else None
        if full:
            return Target(full, managed=True)
        if engine is not None and engine.is_loaded(model):
            return Target(model, managed=False)  # loaded by the admin under a name of its own
        return None

    async def _admit_adapter(self, engine: Engine | None, send: Send, target: Target, label: str) -> bool:
        """Verify the bundle (unless vLLM holds it) and make room for it in the hot set; on failure
        answer the client by the error's kind and return False."""
        if engine is not None and engine.is_loaded(target.name):
            tracing.note_request(hot_set="hit")
            return True
        tracing.note_request(hot_set="miss")
        if engine is not None:
            self.resolver.loaded_refs = lambda: [*engine.loaded(), *self.evictor.in_flight]
        try:
            tracing.phase("fetch")
            await asyncio.to_thread(self.resolver.fetch, target.name)
            tracing.phase("load")
            if engine is not None:
                evicted = await self.evictor.make_room(engine, target.name)
                tracing.note(evicted=len(evicted))
                for name in evicted:
                    self.metrics.adapter_evictions.labels(self.metrics.adapter(name)).inc()
                self.metrics.loaded_adapters.set(len(engine.loaded()))
        except AdapterHubError as exc:
            self.metrics.errors.labels(label, self.metrics.adapter(target.name), exc.kind.value).inc()
            if exc.kind is ErrorKind.NOT_FOUND:
                message = f"The model `{target.name}` does not exist."
                await send_project_error(send, exc, message, param="model")
            elif exc.kind is ErrorKind.INVALID:
                message = f"adapter {target.name} cannot be served: {exc.message}"
                await send_project_error(send, exc, message, param="model", err_type="AdapterRejectedError")
            elif exc.kind is ErrorKind.INTERNAL:  # damage to the store: retrying will not help
                logger.error("adapterhub: adapter %s cannot be served: %s", target.name, safe(exc.message))
                message = (
                    f"adapter {target.name} failed on the server: its stored copy is corrupt or unreadable; "
                    "the operator has the details in the server log"
                )
                await send_project_error(send, exc, message)
            else:  # the registry or its blob store cannot answer: the details (where they are) go to the log
                self._log_outage(exc)
                await send_project_error(send, exc, f"adapter {target.name} is unavailable; retry later")
            return False
        self.metrics.adapter_loads.labels(self.metrics.adapter(target.name)).inc()
        return True

    # -- background work ---------------------------------------------------------------------------

    def _ensure_sweeper(self, scope: Scope) -> None:
        # Idle adapters must go even when no request comes to trigger eviction.
        if self._sweeper is None or self._sweeper.done():
            period = max(1.0, min(30.0, self.config.idle_seconds / 2))

            async def loop() -> None:
                while True:
                    await asyncio.sleep(period)
                    try:
                        await self.sweep(Engine.from_scope(scope))
                    except Exception:  # never let the sweeper die silently
                        logger.exception("adapterhub: eviction sweep failed")

            self._sweeper = asyncio.get_running_loop().create_task(loop())

    def _ensure_watcher(self) -> None:
        # Moved aliases are prefetched even when no request comes (prefetch.py); started at startup.
        if self.config.prefetch_seconds <= 0 or (self._watcher is not None and not self._watcher.done()):
            return
        period = self.config.prefetch_seconds

        async def watch() -> None:
            fetching = asyncio.get_running_loop().create_task(self.prefetcher.run())
            try:
                seen = None
                while True:
                    try:
                        version = self.refresh()
                        if version != seen:
                            seen = version
                            self.prefetcher.saw(self.tenants.all_aliases())
                    except AdapterHubError as exc:  # the store is down: requests say so; look again later
                        self._log_outage(exc)
                    await asyncio.sleep(period)
            finally:
                fetching.cancel()

        self._watcher = asyncio.get_running_loop().create_task(watch())

    async def sweep(self, engine: Engine | None) -> list[str]:
        """Unload idle adapters (and any over the hot set); returns their names."""
        if engine is None:
            return []
        self.resolver.loaded_refs = lambda: [*engine.loaded(), *self.evictor.in_flight]
        evicted = await self.evictor.enforce(engine)
        for name in evicted:
            self.metrics.adapter_evictions.labels(self.metrics.adapter(name)).inc()
        self.metrics.loaded_adapters.set(len(engine.loaded()))
        return evicted

    def _lifespan_send(self, scope: Scope, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self.ledger is not None:
                await asyncio.to_thread(self.ledger.close)  # a clean stop writes every queued row
            if message["type"] == "lifespan.shutdown.complete" and self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)  # exports every span ended so far
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                self._ensure_watcher()
            if message["type"] == "lifespan.startup.complete" and not self.ready:
                task = asyncio.get_running_loop().create_task(self._warm_up(scope.get("app")))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        return lifespan_send

    async def _warm_up(self, app: Any) -> None:
        try:
            await warmup.warm_up(self.app, app, self.config)
        finally:
            self.ready = True  # whatever the outcome: a failed warm-up must not keep the server down
