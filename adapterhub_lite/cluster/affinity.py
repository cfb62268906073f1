"""The routing key of a request: the immutable reference of the adapter it will be served with.

Routing by the tenant's alias would send `support-bot` to the replica that held `@2` after a promote
to `@3`; routing by the full reference sends each version to where *it* is loaded, and a promoted alias
moves to a new key at once. The key is computed the way the replica's tenancy layer will resolve the
request (same store, same view), but nothing here grants access: an unknown key or a model outside the
tenant's view simply has no affinity and the replica refuses it.
"""

from __future__ import annotations

import json

from adapterhub_lite import keys
from adapterhub_lite.registry.contract import RegistryAPI
from adapterhub_lite.serving.gateway.tenant_cache import TenantCache
from adapterhub_lite.tenants.store import TenantStore
from adapterhub_lite.tenants.view import CachedRegistry, resolve_model

INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_BODY_BYTES = 8 * 1024 * 1024


def requested_model(body: bytes) -> str | None:
    """The `model` field of an OpenAI request body, or None if there is none (or it is not JSON)."""
    if not body or len(body) > MAX_BODY_BYTES:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and len(model) <= 512 else None


class AffinityKeyer:
    """Maps (API key, model) to the reference vLLM will see; re-reads tenants when the store changes."""

    def __init__(self, store: TenantStore, registry: RegistryAPI, base_names: set[str]) -> None:
        self.tenants = TenantCache(store)
        self.view = CachedRegistry(registry)
        self.base_names = set(base_names)

    def key(self, path: str, authorization: str | None, body: bytes) -> str | None:
        """The affinity key of a request, or None when it has none (not inference, unknown, refused)."""
        if path not in INFERENCE_PATHS:
            return None
        api_key, model = keys.bearer(authorization), requested_model(body)
        if api_key is None or model is None:
            return None
        self.tenants.refresh()
        tenant = self.tenants.tenant(api_key)
        if tenant is None:
            return None
        target = resolve_model(model, tenant, self.tenants.aliases(tenant.name), self.base_names, self.view)
        return target.name if target is not None else None
