"""The Grafana dashboard in docs/grafana/ asks only for metrics (and labels) the server exposes.

Every PromQL expression of the dashboard is parsed down to its metric names and label matchers, which must
be series `serving.gateway.metrics.ServingMetrics` registers: a renamed metric breaks this test
instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "adapterhub.json"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")


def exposed() -> dict[str, set[str]]:
    """Sample name -> its labels, for every series ServingMetrics registers."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from adapterhub_lite.serving.gateway.metrics import ServingMetrics

    out: dict[str, set[str]] = {}
    for metric in vars(ServingMetrics(CollectorRegistry())).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames) | {"instance", "job"}  # Prometheus adds the target's own
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
        for suffix in suffixes[metric._type]:
            out[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


def metric_names(expr: str) -> dict[str, set[str]]:
    """Metric name -> the labels its selectors and groupings name, in one PromQL expression."""
    if expr.startswith("label_values("):  # Grafana's variable query: label_values(metric, label)
        metric, label = re.fullmatch(r"label_values\(\s*([^,\s]+)\s*,\s*([^)\s]+)\s*\)", expr).groups()
        return {metric: {label}}
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, never names
    found: dict[str, set[str]] = {}
    for name, matchers in _SELECTOR.findall(expr):
        found.setdefault(name, set()).update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*[=!]~?", matchers))
    grouped = set()
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        grouped.update(x.strip() for x in labels.split(",") if x.strip())
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                  " ", expr)
    for match in _IDENT.finditer(bare):
        token, rest = match.group(), bare[match.end():].lstrip()
        if rest.startswith("(") or token in _KEYWORDS or token.startswith("$"):
            continue  # a function, a keyword or a Grafana variable
        if bare[match.start() - 1: match.start()] == "$":
            continue
        found.setdefault(token, set())
    for name in found:
        found[name] |= grouped
    return found


def test_every_metric_and_label_the_dashboard_asks_for_exists():
    dashboard = json.loads(DASHBOARD.read_text())
    series = exposed()
    asked: dict[str, set[str]] = {}
    for expr in expressions(dashboard):
        for name, labels in metric_names(expr).items():
            asked.setdefault(name, set()).update(labels)
    unknown = sorted(set(asked) - set(series))
    assert not unknown, f"the dashboard asks for metrics the server does not expose: {unknown}"
    for name, labels in asked.items():
        # a grouping may name labels of another metric in the same expression: `le` of the buckets
        missing = labels - series[name] - {"le"}
        assert not missing, f"{name} has no label(s) {sorted(missing)}"
    # The panels the issue asks for: traffic, tokens, errors, latency, hot set, cache, loads.
    wanted = {"adapterhub_requests_total", "adapterhub_completion_tokens_total", "adapterhub_errors_total",
              "adapterhub_request_duration_seconds_bucket", "adapterhub_loaded_adapters",
              "adapterhub_cache_bytes", "adapterhub_adapter_loads_total"}
    assert wanted <= set(asked)


def test_the_parser_finds_names_in_every_position():
    expr = ('histogram_quantile(0.95, sum by (tenant, le) (rate(x_bucket{tenant=~"$tenant"}[5m]))) '
            '/ ignoring(a) sum(y_total) + on() z')
    assert metric_names(expr) == {"x_bucket": {"tenant", "le"}, "y_total": {"tenant", "le"},
                                  "z": {"tenant", "le"}}
