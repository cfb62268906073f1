"""Per-tenant, per-adapter Prometheus counters, exposed on the server's own `/metrics` beside vLLM's.

vLLM serves `/metrics` from prometheus_client's default registry (in its API server process), so
counters registered there by the middleware appear on the same page with no extra route.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class ServingMetrics:
    """The adapterhub_* metrics; one instance per registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
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


_DEFAULT: ServingMetrics | None = None


def default_metrics() -> ServingMetrics:
    """The process-wide metrics on prometheus_client's default registry (created once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = ServingMetrics()
    return _DEFAULT
