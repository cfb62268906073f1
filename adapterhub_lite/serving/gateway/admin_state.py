"""What the admin routes may see of the gateway: a narrow view, not the middleware itself.

`admin.py`, `admin_load.py` and `rollout_admin.py` take an `AdminState`; `TenancyMiddleware` satisfies it
as it stands, so the routes never import the middleware that imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.asgi import App
    from adapterhub_lite.serving.gateway.eviction import Evictor
    from adapterhub_lite.serving.gateway.ledger import UsageLedger
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.prefetch import Prefetcher
    from adapterhub_lite.serving.gateway.rollout_router import RolloutRouter
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver
    from adapterhub_lite.tenants.view import CachedRegistry


class AdminState(Protocol):
    """The gateway's parts an admin route reads or acts on."""

    app: App  # vLLM's own app, for the load route's hand-off
    config: ServingConfig
    evictor: Evictor
    metrics: ServingMetrics
    resolver: AdapterResolver
    rollouts: RolloutRouter
    ledger: UsageLedger | None
    prefetcher: Prefetcher
    ready: bool

    @property
    def registry(self) -> CachedRegistry: ...

    @property
    def tenants_version(self) -> int: ...

    def refresh(self, force: bool = False) -> int: ...
