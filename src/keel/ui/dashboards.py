"""The dashboards page: requests, errors, latency percentiles, TTFT, tokens, cost and scores over time,
and broken down by model, user, session, tag or prompt version.

Every number comes from the queries behind ``/api/metrics/...`` (keel.store.metrics), so the page
and the API agree; charts are server-rendered SVG (keel.ui.charts).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from keel.store import utcnow
from keel.store.metrics import INTERVALS, Metrics
from keel.ui.charts import Chart, line_chart
from keel.ui.context import UIContext
from keel.ui.views import fmt_cost, fmt_ms

__all__ = ["build"]

RANGES: dict[str, tuple[str, timedelta]] = {
    "1h": ("Last hour", timedelta(hours=1)),
    "24h": ("Last 24 h", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
}
DEFAULT_RANGE = "24h"
GROUPS: dict[str, str] = {
    "model": "Model",
    "user": "User",
    "session": "Session",
    "tag": "Tag",
    "prompt_version": "Prompt version",
}
TOP_GROUPS = 10
CHART_GROUPS = 5
# where a group's traces are listed: the trace explorer's filter for that dimension
TRACE_FILTERS = {"model": "model", "user": "user", "tag": "tag", "session": "session"}


def fmt_count(v: float) -> str:
    """1,234 up to 10k, then 12.3k, 4.5M."""
    if abs(v) >= 1_000_000:
        return f"{v / 1_000_000:.1f}M".replace(".0M", "M")
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f}k".replace(".0k", "k")
    return f"{v:,.0f}" if v == int(v) else f"{v:,.2f}"


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "—"
    pct = v * 100
    return f"{pct:.0f}%" if pct >= 10 or pct == 0 else f"{pct:.1f}%"


def _url(params: dict[str, str], **changes: str | None) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v}
    return "/dashboards" + ("?" + urlencode(merged) if merged else "")


def _charts(ts: dict[str, Any]) -> list[tuple[str, str, Chart]]:
    """The totals charts: (title, test id, chart)."""
    pts = ts["series"][0]["points"] if ts["series"] else []
    times = [p["t"] for p in pts]
    step = INTERVALS[ts["interval"]]

    def col(name: str) -> list[float | None]:
        return [p[name] for p in pts]

    def chart(series: list[tuple[str, list[float | None]]], fmt: Any) -> Chart:
        return line_chart(times, series, step_s=step, fmt=fmt, whole=fmt is fmt_count)

    return [
        (
            "Requests",
            "chart-requests",
            chart([("requests", col("requests")), ("errors", col("errors"))], fmt_count),
        ),
        ("Error rate", "chart-error-rate", chart([("error rate", col("error_rate"))], fmt_rate)),
        (
            "Latency",
            "chart-latency",
            chart(
                [
                    ("P50", col("latency_p50_ms")),
                    ("P95", col("latency_p95_ms")),
                    ("P99", col("latency_p99_ms")),
                ],
                fmt_ms,
            ),
        ),
        ("Time to first token (mean)", "chart-ttft", chart([("TTFT", col("ttft_avg_ms"))], fmt_ms)),
        (
            "Tokens",
            "chart-tokens",
            chart([("input", col("input_tokens")), ("output", col("output_tokens"))], fmt_count),
        ),
        ("Cost", "chart-cost", chart([("cost", col("cost_usd"))], fmt_cost)),
    ]


def _group_charts(ts: dict[str, Any], label: str) -> list[tuple[str, str, Chart]]:
    step = INTERVALS[ts["interval"]]
    series = ts["series"]
    if not series:
        return []
    times = [p["t"] for p in series[0]["points"]]

    def chart(metric: str, fmt: Any) -> Chart:
        return line_chart(
            times,
            [(s["group"] or f"(no {label.lower()})", [p[metric] for p in s["points"]]) for s in series],
            step_s=step,
            fmt=fmt,
            whole=fmt is fmt_count,
        )

    return [
        (f"Requests by {label.lower()}", "group-chart-requests", chart("requests", fmt_count)),
        (f"P95 latency by {label.lower()}", "group-chart-p95", chart("latency_p95_ms", fmt_ms)),
        (f"Cost by {label.lower()}", "group-chart-cost", chart("cost_usd", fmt_cost)),
    ]


def build(ui: UIContext) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/dashboards")
    async def dashboards(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = ui.state(request).store
        q = request.query_params
        notices: list[str] = []
        rng = q.get("range") or DEFAULT_RANGE
        if rng not in RANGES:
            notices.append(f"Unknown time range {rng!r}; showing the {RANGES[DEFAULT_RANGE][0].lower()}.")
            rng = DEFAULT_RANGE
        by = q.get("by") or "model"
        if by not in GROUPS:
            notices.append(f"Cannot break down by {by!r}; showing models.")
            by = "model"
        projects: list[dict[str, Any]] = []
        project_id = ui.scope(p)
        params = {"range": rng, "by": by}
        if p.is_master:
            projects = await run_in_threadpool(store.list_projects)
            wanted = q.get("project") or ""
            if wanted:
                match = next((x for x in projects if wanted in (x["id"], x["name"])), None)
                if match is None:
                    notices.append(f"Unknown project {wanted!r}; showing every project.")
                else:
                    project_id = match["id"]
                    params["project"] = match["id"]
        end = utcnow()
        start = end - RANGES[rng][1]
        metrics = Metrics(store.engine)

        def load() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
            summary = metrics.summary(
                start=start, end=end, project_id=project_id, group_by=by, limit=TOP_GROUPS
            )
            ts = metrics.timeseries(start=start, end=end, project_id=project_id)
            grouped = metrics.timeseries(
                start=start, end=end, project_id=project_id, group_by=by, limit=CHART_GROUPS
            )
            scores = metrics.scores(start=start, end=end, project_id=project_id)
            return summary, ts, grouped, scores

        summary, ts, grouped, scores = await run_in_threadpool(load)
        label = GROUPS[by]
        filt = TRACE_FILTERS.get(by)
        rows = [
            {
                **g,
                "label": g["group"] or f"(no {label.lower()})",
                "href": "/traces?" + urlencode({filt: g["group"]}) if filt and g["group"] else None,
            }
            for g in summary["groups"]
        ]
        return ui.render(
            request,
            "dashboards.html",
            who=ui.who(request, p),
            params=params,
            projects=projects,
            ranges=[(k, v[0]) for k, v in RANGES.items()],
            range_url=lambda key: _url(params, range=key),
            groups=list(GROUPS.items()),
            group_url=lambda key: _url(params, by=key),
            active_range=rng,
            by=by,
            group_label=label,
            totals=summary["totals"],
            charts=_charts(ts),
            group_charts=_group_charts(grouped, label),
            rows=rows,
            interval=ts["interval"],
            start=summary["start"].replace(tzinfo=UTC),
            end=summary["end"].replace(tzinfo=UTC),
            scores=scores["scores"],
            notices=notices,
            fmt_count=fmt_count,
            fmt_rate=fmt_rate,
            now=datetime.now(UTC),
        )

    return router
