"""Gateway counters and histograms, kept as plain numbers on the hot path and exported lazily.

Observing a request is a few dict and list operations; /metrics turns them into Prometheus
families only when scraped.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["GatewayStats", "Histogram"]

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class Histogram:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append((repr(b), acc))
        acc += self.counts[-1]
        out.append(("+Inf", acc))
        return out


class GatewayStats:
    """All the gateway's metrics, one instance per process."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.overhead: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.ttft: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.by_deployment: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.retries: defaultdict[str, int] = defaultdict(int)
        self.fallbacks: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.cooldowns: defaultdict[str, int] = defaultdict(int)
        self.cost: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.cache_hits: defaultdict[str, int] = defaultdict(int)
        self.budget_alerts: defaultdict[str, int] = defaultdict(int)
        self.limit_rejections: defaultdict[tuple[str, str], int] = defaultdict(int)  # (scope type, limit)
        # (scope, period) -> (limit, spent, reserved) USD, refreshed after settlements (at most 1/s each)
        self.budgets: dict[tuple[str, str], tuple[float, float, float]] = {}
        self.health: Any = None  # a HealthBoard, for the cooldown-state gauge
        self.gauges: dict[str, Any] = {}
        self.counters: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        c = CounterMetricFamily(
            "keel_requests",
            "Gateway requests by route, model and status",
            labels=["route", "model", "status"],
        )
        for (route, model, status), n in list(self.requests.items()):
            c.add_metric([route, model, status], n)
        yield c
        e = CounterMetricFamily("keel_errors", "Gateway errors by route and code", labels=["route", "code"])
        for (route, code), n in list(self.errors.items()):
            e.add_metric([route, code], n)
        yield e
        d = CounterMetricFamily(
            "keel_deployment_requests",
            "Requests served by deployment and status",
            labels=["deployment", "status"],
        )
        for (dep, status), n in list(self.by_deployment.items()):
            d.add_metric([dep, status], n)
        yield d
        r = CounterMetricFamily("keel_retries", "Retries by deployment", labels=["deployment"])
        for dep, n in list(self.retries.items()):
            r.add_metric([dep], n)
        yield r
        f = CounterMetricFamily("keel_fallbacks", "Fallbacks taken", labels=["model", "to", "kind"])
        for (model, to, kind), n in list(self.fallbacks.items()):
            f.add_metric([model, to, kind], n)
        yield f
        cd = CounterMetricFamily(
            "keel_cooldowns", "Times a deployment was put into cooldown", labels=["deployment"]
        )
        for dep, n in list(self.cooldowns.items()):
            cd.add_metric([dep], n)
        yield cd
        ba = CounterMetricFamily("keel_budget_alerts", "Soft budget limits crossed", labels=["scope"])
        for scope, n in list(self.budget_alerts.items()):
            ba.add_metric([scope], n)
        yield ba
        lr = CounterMetricFamily(
            "keel_limit_rejections",
            "Requests refused by a rate limit or budget, by scope type and limit",
            labels=["scope", "limit"],
        )
        for (scope, limit), n in list(self.limit_rejections.items()):
            lr.add_metric([scope, limit], n)
        yield lr
        if self.budgets:
            bl = GaugeMetricFamily("keel_budget_limit_usd", "Hard budget", labels=["scope", "period"])
            bs = GaugeMetricFamily(
                "keel_budget_spent_usd", "Spent in the current period", labels=["scope", "period"]
            )
            br = GaugeMetricFamily(
                "keel_budget_remaining_usd",
                "Budget left in the current period (limit - spent - reserved)",
                labels=["scope", "period"],
            )
            for (scope, period), (hard, spent, reserved) in list(self.budgets.items()):
                labels = [scope, period]
                if math.isfinite(hard):
                    bl.add_metric(labels, hard)
                    br.add_metric(labels, max(0.0, hard - spent - reserved))
                bs.add_metric(labels, spent)
            yield bl
            yield bs
            yield br
        ch = CounterMetricFamily("keel_cache_hits", "Requests answered from the cache", labels=["kind"])
        for kind, n in list(self.cache_hits.items()):
            ch.add_metric([kind], n)
        yield ch
        cost = CounterMetricFamily(
            "keel_cost_usd", "USD spent by model and deployment", labels=["model", "deployment"]
        )
        for (model, dep), v in list(self.cost.items()):
            cost.add_metric([model, dep], v)
        yield cost
        if self.health is not None:
            g = GaugeMetricFamily(
                "keel_deployment_cooling_down", "1 while a deployment is in cooldown", labels=["deployment"]
            )
            lat = GaugeMetricFamily(
                "keel_deployment_latency_ewma_seconds", "EWMA latency per deployment", labels=["deployment"]
            )
            for key, snap in self.health.snapshot().items():
                g.add_metric([key], 1.0 if snap["state"] == "cooldown" else 0.0)
                if snap["ewma_latency_ms"] is not None:
                    lat.add_metric([key], snap["ewma_latency_ms"] / 1000)
            yield g
            yield lat
        t = CounterMetricFamily("keel_tokens", "Tokens by model and direction", labels=["model", "direction"])
        for (model, direction), n in list(self.tokens.items()):
            t.add_metric([model, direction], n)
        yield t
        for name, doc, hists in (
            ("keel_request_duration_seconds", "End-to-end request latency", self.latency),
            ("keel_overhead_seconds", "Latency keel adds on top of the upstream call", self.overhead),
            ("keel_ttft_seconds", "Time to first token of streams", self.ttft),
        ):
            h = HistogramMetricFamily(name, doc, labels=["route"])
            for route, hist in list(hists.items()):
                h.add_metric([route], hist.cumulative(), sum_value=hist.sum)
            yield h
        for name, (doc, fn) in self.gauges.items():
            yield GaugeMetricFamily(name, doc, value=fn())
        for name, (doc, fn) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=fn())
