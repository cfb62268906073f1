"""The adapterhub_* series stay bounded while adapters churn (a server runs for weeks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from adapterhub_lite.serving.gateway.metrics import OTHER, ServingMetrics


def _series(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name
    }


def test_new_references_past_the_bound_count_as_other_and_nothing_is_lost():
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry, max_adapters=4)
    for i in range(500):
        ref = f"acme/churn@1.0.{i}"
        metrics.requests.labels("acme", metrics.adapter(ref), "200").inc()
        metrics.adapter_loads.labels(metrics.adapter(ref)).inc()
    requests = _series(registry, "adapterhub_requests_total")
    assert len(requests) == 5  # four references of their own, then `other`
    assert sum(requests.values()) == 500
    assert requests[(("adapter", OTHER), ("status", "200"), ("tenant", "acme"))] == 496
    assert len(_series(registry, "adapterhub_adapter_loads_total")) == 5
    # A reference that has its series keeps it; the base model (no adapter) is never capped.
    assert metrics.adapter("acme/churn@1.0.0") == "acme/churn@1.0.0" and metrics.adapter("") == ""


def test_the_bound_comes_from_the_settings(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_METRICS_MAX_ADAPTERS", "2")
    metrics = ServingMetrics(CollectorRegistry())
    assert [metrics.adapter(f"a/b@{i}") for i in range(4)] == ["a/b@0", "a/b@1", OTHER, OTHER]
