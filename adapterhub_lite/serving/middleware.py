"""Tenancy inside vLLM's own API server: an ASGI middleware given to vLLM with `--middleware`.

For every HTTP request it
- authenticates the `Authorization: Bearer` key: the admin key, or a tenant's key (else 401);
- lets a tenant reach only `/v1/completions`, `/v1/chat/completions` and `/v1/models` (else 403);
  load/unload, `/adapterhub/v1/*` management routes and everything else are admin-only;
- resolves the request's `model` in the tenant's view (alias -> immutable full reference); outside the
  view the answer is the same 404 whether or not the model exists elsewhere;
- applies the tenant's rate limits (429 with Retry-After);
- verifies (and caches) the bundle before vLLM sees its name, so a bad bundle gets a clear 422 and is
  never loaded;
- rewrites `model` to the full reference and passes the request on; the response, streaming or not,
  goes back untouched while its usage is counted in Prometheus;
- unloads cold adapters beyond the configured hot set.

Why middleware and not a `vllm.endpoint_plugins` plugin: an endpoint plugin can only add routes, while
tenancy has to see, refuse or rewrite every request before vLLM's own routes do; `--middleware` is the
hook vLLM offers for that, and it keeps the user's own `vllm serve` command line working.

Alias moves made by `adapterhub tenant promote` in another process are seen by the very next request:
the store is probed with `PRAGMA data_version` (about 4 us measured) and re-read (about 35 us) only when
it changed. A polled cache with a TTL would have been as cheap but would serve the old version for up to
a TTL after a promote; an admin "reload" route would need the CLI to know every server. The promote ->
first-token time is in benchmarks/results/serving.json (hot_swap_s).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adapterhub_lite.errors import AdapterHubError, BundleError, RegistryError
from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.eviction import Evictor
from adapterhub_lite.serving.metrics import ServingMetrics, default_metrics
from adapterhub_lite.serving.ratelimit import RateLimiter
from adapterhub_lite.serving.resolver import AdapterResolver, get_resolver
from adapterhub_lite.serving.tenancy import Tenant, TenantStore, hash_key
from adapterhub_lite.serving.usage import UsageMeter, ask_for_stream_usage, without_usage_event
from adapterhub_lite.serving.view import RegistryView, Target, resolve_model

logger = logging.getLogger("adapterhub.serving")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PUBLIC_PATHS = {"/health", "/ping", "/version"}
INFERENCE_PATHS = {"/v1/completions", "/v1/chat/completions"}
MODELS_PATH = "/v1/models"
ADMIN_PREFIX = "/adapterhub/v1/"
MAX_BODY_BYTES = 8 * 1024 * 1024


class TenancyMiddleware:
    """ASGI middleware; vLLM constructs it as `TenancyMiddleware(app)` and the rest comes from the env."""

    def __init__(
        self,
        app: Any,
        config: ServingConfig | None = None,
        store: TenantStore | None = None,
        resolver: AdapterResolver | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.app = app
        self.config = config or ServingConfig.from_env()
        if not self.config.admin_key:
            logger.warning("adapterhub: ADAPTERHUB_ADMIN_KEY is not set; admin routes are closed to everyone")
        self._admin_key = self.config.admin_key.encode() if self.config.admin_key else None
        self.store = store or TenantStore.open(self.config.tenants_db)
        self.resolver = resolver or get_resolver()
        self.metrics = metrics or default_metrics()
        self.limiter = RateLimiter()
        self.evictor = Evictor(self.config.max_loaded, self.config.idle_seconds)
        self._registry_view: RegistryView | None = None
        self._version = -1
        self._tenants_by_hash: dict[str, Tenant] = {}
        self._aliases: dict[str, dict[str, str]] = {}
        self._idle_task: asyncio.Task | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def registry_view(self) -> RegistryView:
        if self._registry_view is None:
            self._registry_view = RegistryView(lambda: self.resolver.registry)
        return self._registry_view

    def _refresh(self) -> None:
        version = self.store.data_version()
        if version != self._version:
            self._tenants_by_hash.clear()
            self._aliases = self.store.all_aliases()
            self._version = version

    def _tenant_for(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        tenant = self._tenants_by_hash.get(digest)
        if tenant is None:
            tenant = self.store.authenticate(key)
            if tenant is not None:  # unknown keys are not cached: random keys must not grow memory
                self._tenants_by_hash[digest] = tenant
        return tenant

    @staticmethod
    def _serving_models(scope: Scope) -> Any:
        app = scope.get("app")
        return getattr(getattr(app, "state", None), "openai_serving_models", None)

    def _base_names(self, scope: Scope) -> set[str]:
        models = self._serving_models(scope)
        names = {m.name for m in models.base_model_paths} if models is not None else set()
        if self.config.served_name:
            names.add(self.config.served_name)
        return names

    # -- ASGI --------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # WebSockets (realtime audio) carry no tenant model mapping: closed to tenants.
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        self._ensure_idle_task(scope)
        key = _bearer(scope)
        if key is None:
            self.metrics.rejected.labels("", "no_key").inc()
            await _error(
                send,
                401,
                "missing API key: send `Authorization: Bearer <key>`",
                "AuthenticationError",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        if self._admin_key is not None and hmac.compare_digest(key.encode("latin-1"), self._admin_key):
            if path.startswith(ADMIN_PREFIX):
                await self._admin_route(scope, receive, send)
            elif path in INFERENCE_PATHS and scope["method"] == "POST":
                await self._inference(scope, receive, send, tenant=None)
            else:
                await self.app(scope, receive, send)
            return
        self._refresh()
        tenant = self._tenant_for(key)
        if tenant is None:
            self.metrics.rejected.labels("", "bad_key").inc()
            await _error(
                send,
                401,
                "invalid or revoked API key",
                "AuthenticationError",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        if path == MODELS_PATH and scope["method"] == "GET":
            await self._list_models(scope, send, tenant)
        elif path in INFERENCE_PATHS and scope["method"] == "POST":
            await self._inference(scope, receive, send, tenant=tenant)
        else:
            self.metrics.rejected.labels(tenant.name, "admin_route").inc()
            await _error(send, 403, f"{path} needs the admin key", "PermissionDeniedError")

    # -- tenant routes -----------------------------------------------------------------------------

    async def _list_models(self, scope: Scope, send: Send, tenant: Tenant) -> None:
        now = int(time.time())
        data = []
        if tenant.base_access:
            for name in sorted(self._base_names(scope)):
                data.append({"id": name, "object": "model", "created": now, "owned_by": "adapterhub"})
        for alias, ref in sorted(self._aliases.get(tenant.name, {}).items()):
            data.append(
                {"id": alias, "object": "model", "created": now, "owned_by": tenant.namespace, "root": ref}
            )
        # Then every adapter the tenant may name as `namespace/name` (own, shared, public) for this base.
        # The first call hashes the base's weights: off the event loop.
        fingerprint = await asyncio.to_thread(self._served_fingerprint)
        for package, ref in self.registry_view.readable(tenant.namespace, fingerprint):
            owner = package.split("/", 1)[0]
            data.append({"id": package, "object": "model", "created": now, "owned_by": owner, "root": ref})
        await _json(send, 200, {"object": "list", "data": data})

    def _served_fingerprint(self) -> str | None:
        """The served base's fingerprint, or None (no filter) where the server was not told its base."""
        try:
            return self.resolver.base_fingerprint()
        except AdapterHubError:
            return None

    async def _inference(self, scope: Scope, receive: Receive, send: Send, tenant: Tenant | None) -> None:
        body = await _read_body(receive)
        label = tenant.name if tenant else "admin"
        if body is None:
            await _error(send, 413, f"request body over {MAX_BODY_BYTES} bytes", "BadRequestError")
            return
        try:
            payload = json.loads(body)
            model = payload["model"]
            if not isinstance(model, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            await _error(send, 400, "the body must be a JSON object with a string `model`", "BadRequestError")
            return

        if tenant is None:
            target = self._admin_target(scope, model)
        else:
            # Inline: aliases are in memory and registry answers are memoized (a miss is one SQLite read).
            target = resolve_model(
                model,
                tenant,
                self._aliases.get(tenant.name, {}),
                self._base_names(scope),
                self.registry_view,
            )
        if target is None:
            self.metrics.rejected.labels(label, "unknown_model").inc()
            await _error(send, 404, f"The model `{model}` does not exist.", "NotFoundError", param="model")
            return

        if tenant is not None:
            wait = self.limiter.admit(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute)
            if wait is not None:
                self.metrics.rejected.labels(label, "rate_limited").inc()
                await _error(
                    send,
                    429,
                    f"rate limit exceeded; retry in {int(wait)} s",
                    "RateLimitError",
                    headers=[(b"retry-after", str(int(wait)).encode())],
                )
                return

        adapter_label = "" if target.is_base else target.name
        if not target.is_base:
            self.evictor.begin(target.name)
        try:
            if not target.is_base and not await self._ensure_loadable(scope, send, target, label):
                return
            payload["model"] = target.name
            hide_usage = ask_for_stream_usage(payload)
            await self._forward(
                scope, receive, send, json.dumps(payload).encode(), label, adapter_label, tenant, hide_usage
            )
        finally:
            if not target.is_base:
                self.evictor.end(target.name)
        await self._evict(scope)

    def _admin_target(self, scope: Scope, model: str) -> Target | None:
        if model in self._base_names(scope):
            return Target(model, True)
        full = self.registry_view.full_ref(model) if "/" in model else None
        if full:
            return Target(full, False)
        models = self._serving_models(scope)
        if models is not None and model in models.lora_requests:
            return Target(model, True)  # loaded by the admin under a name of its own: pass through
        return None

    async def _ensure_loadable(self, scope: Scope, send: Send, target: Target, label: str) -> bool:
        """Verify the bundle unless vLLM already holds it; on failure answer the client and return False."""
        models = self._serving_models(scope)
        if models is not None and target.name in models.lora_requests:
            return True
        try:
            await asyncio.to_thread(self.resolver.fetch, target.name)
        except RegistryError:
            self.metrics.errors.labels(label, target.name, "not_found").inc()
            await _error(
                send, 404, f"The model `{target.name}` does not exist.", "NotFoundError", param="model"
            )
            return False
        except BundleError as exc:
            self.metrics.errors.labels(label, target.name, "bundle_rejected").inc()
            await _error(
                send,
                422,
                f"adapter {target.name} cannot be served: {exc.message}",
                "AdapterRejectedError",
                param="model",
            )
            return False
        except AdapterHubError as exc:
            self.metrics.errors.labels(label, target.name, "unavailable").inc()
            await _error(
                send, 503, f"adapter {target.name} is unavailable: {exc.message}", "ServiceUnavailable"
            )
            return False
        self.metrics.adapter_loads.labels(target.name).inc()
        return True

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        label: str,
        adapter: str,
        tenant: Tenant | None,
        hide_usage: bool = False,
    ) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"authorization")]
        headers.append((b"content-length", str(len(body)).encode()))
        inner_scope = dict(scope, headers=headers)
        sent = False

        async def inner_receive() -> MutableMapping[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            # vLLM watches for the client going away to cancel generation: pass the real signal on.
            return await receive()

        usage = UsageMeter()

        async def inner_send(message: MutableMapping[str, Any]) -> None:
            usage.observe(message)
            if hide_usage and usage.streaming and message["type"] == "http.response.body":
                message = {**message, "body": without_usage_event(message.get("body", b""))}
            await send(message)

        try:
            await self.app(inner_scope, inner_receive, inner_send)
        finally:
            status = usage.status or 500
            self.metrics.requests.labels(label, adapter, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(label, adapter, f"http_{status}").inc()
            prompt, completion = usage.tokens()
            self.metrics.prompt_tokens.labels(label, adapter).inc(prompt)
            self.metrics.completion_tokens.labels(label, adapter).inc(completion)
            if tenant is not None:
                self.limiter.charge_tokens(tenant.name, tenant.tokens_per_minute, prompt + completion)

    # -- eviction ----------------------------------------------------------------------------------

    async def _evict(self, scope: Scope) -> None:
        models = self._serving_models(scope)
        if models is None:
            return
        self.resolver.loaded_refs = lambda: list(models.lora_requests)
        for name in await self.evictor.enforce(models):
            self.metrics.adapter_evictions.labels(name).inc()
        self.metrics.loaded_adapters.set(len(models.lora_requests))

    def _ensure_idle_task(self, scope: Scope) -> None:
        # Idle adapters must go even when no request comes to trigger eviction.
        if self._idle_task is None or self._idle_task.done():
            period = max(1.0, min(30.0, self.config.idle_seconds / 2))

            async def loop() -> None:
                while True:
                    await asyncio.sleep(period)
                    try:
                        await self._evict(scope)
                    except Exception:  # never let the sweeper die silently
                        logger.exception("adapterhub: eviction sweep failed")

            self._idle_task = asyncio.get_running_loop().create_task(loop())

    # -- admin routes ------------------------------------------------------------------------------

    async def _admin_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"][len(ADMIN_PREFIX) :]
        models = self._serving_models(scope)
        if path == "status" and scope["method"] == "GET":
            loaded = list(models.lora_requests) if models is not None else []
            await _json(
                send,
                200,
                {
                    "loaded": loaded,
                    "in_flight": dict(self.evictor.in_flight),
                    "capacity": self.evictor.capacity,
                    "idle_seconds": self.evictor.idle_seconds,
                    "cache": [p.name for p in self.resolver.cache.entries()],
                    "tenants_version": self._version,
                },
            )
        elif path == "evict" and scope["method"] == "POST":
            body = await _read_body(receive) or b"{}"
            try:
                name = json.loads(body)["adapter"]
            except (ValueError, KeyError, TypeError):
                await _error(send, 400, 'body must be {"adapter": "<full reference>"}', "BadRequestError")
                return
            if models is None or name not in models.lora_requests:
                await _error(send, 404, f"adapter {name} is not loaded", "NotFoundError")
                return
            if self.evictor.in_flight[name]:
                await _error(send, 409, f"adapter {name} has requests in flight", "ConflictError")
                return
            self.evictor.last_used[name] = 0.0  # oldest
            capacity, self.evictor.capacity = self.evictor.capacity, 0
            try:
                evicted = await self.evictor.enforce(models)
            finally:
                self.evictor.capacity = capacity
            await _json(send, 200, {"evicted": evicted})
        elif path == "refresh" and scope["method"] == "POST":
            self._version = -1
            self._refresh()
            if self._registry_view is not None:
                self._registry_view.clear()
            await _json(send, 200, {"tenants_version": self._version})
        else:
            await _error(send, 404, f"no admin route {scope['path']}", "NotFoundError")


def _bearer(scope: Scope) -> str | None:
    for k, v in scope["headers"]:
        if k == b"authorization":
            value = v.decode("latin-1")
            if value[:7].lower() == "bearer " and value[7:].strip():
                return value[7:].strip()
    return None


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _json(send: Send, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send,
    status: int,
    message: str,
    err_type: str,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    # The OpenAI error shape, as vLLM itself answers, so official clients raise the usual exceptions.
    await _json(
        send,
        status,
        {"error": {"message": message, "type": err_type, "param": param, "code": status}},
        headers,
    )
