"""Per-tenant, per-adapter Prometheus counters, exposed on the server's own `/metrics` beside vLLM's.

vLLM serves `/metrics` from prometheus_client's default registry (in its API server process), so
counters registered there by the middleware appear on the same page with no extra route.

The `adapter` label is an immutable reference, and a server that runs for weeks sees new versions
without end: the first `ADAPTERHUB_METRICS_MAX_ADAPTERS` distinct references get series of their own,
later ones are counted under `adapter="other"`, so the series count stays bounded under churn (the
usage ledger keeps every reference exactly).
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from adapterhub_lite.settings import settings

OTHER = "other"
# Seconds from handing a request to vLLM to its last byte: a cached short answer to a long stream.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServingMetrics:
    """The adapterhub_* metrics; one instance per registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, max_adapters: int | None = None) -> None:
        self.max_adapters = max_adapters if max_adapters is not None else settings().metrics_max_adapters
        self._adapters: set[str] = set()
        self._lock = threading.Lock()
        labels = ["tenant", "adapter"]
        self.requests = Counter(
            "adapterhub_requests",
            "Requests per tenant and adapter, by HTTP status.",
            [*labels, "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "adapterhub_prompt_tokens", "Prompt tokens per tenant and adapter.", labels, registry=registry
        )
        self.completion_tokens = Counter(
            "adapterhub_completion_tokens",
            "Completion tokens per tenant and adapter.",
            labels,
            registry=registry,
        )
        self.errors = Counter(
            "adapterhub_errors",
            "Failed requests (4xx/5xx) per tenant and adapter, by reason.",
            [*labels, "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "adapterhub_rejected",
            "Requests refused before reaching vLLM, by reason.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "adapterhub_adapter_loads",
            "Adapters verified and handed to vLLM.",
            ["adapter"],
            registry=registry,
        )
        self.adapter_evictions = Counter(
            "adapterhub_adapter_evictions",
            "Cold adapters unloaded from vLLM.",
            ["adapter"],
            registry=registry,
        )
        self.loaded_adapters = Gauge(
            "adapterhub_loaded_adapters", "Adapters currently loaded in vLLM.", registry=registry
        )
        self.request_seconds = Histogram(
            "adapterhub_request_duration_seconds",
            "Seconds from forwarding a request to vLLM to its last byte, per tenant.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "adapterhub_cache_bytes", "Bytes of verified bundles in the disk cache.", registry=registry
        )

    def track_cache(self, cache: Any) -> None:
        """`adapterhub_cache_bytes` reads the size of `cache` (a BundleCache) at each scrape."""

        def size() -> float:
            try:
                return float(cache.total_bytes())
            except OSError:  # an entry removed while it was being measured: the next scrape tells
                return 0.0

        self.cache_bytes.set_function(size)

    def adapter(self, ref: str) -> str:
        """The `adapter` label of `ref`: itself while the bound allows a new series, else `other`."""
        if not ref or ref in self._adapters:
            return ref
        with self._lock:
            if len(self._adapters) < self.max_adapters:
                self._adapters.add(ref)
                return ref
        return OTHER


_DEFAULT: ServingMetrics | None = None


def default_metrics() -> ServingMetrics:
    """The process-wide metrics on prometheus_client's default registry (created once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ServingMetrics()
    return _DEFAULT
