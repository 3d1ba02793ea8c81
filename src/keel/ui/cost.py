"""The cost page: spend over time, breakdowns by project, team, key, user, model and tag, and budgets.

Numbers come from the same queries as ``GET /api/usage``; budget status from the gateway's ledger
(the shared Redis ledger with ``KEEL_REDIS_URL``), so the page shows what the gateway enforces.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from keel.gateway.limits import PERIODS, Budget
from keel.store import utcnow
from keel.types import Principal
from keel.ui.context import UIContext

__all__ = ["build"]

RANGES: dict[str, tuple[str, timedelta, str]] = {
    "24h": ("Last 24 h", timedelta(hours=24), "hour"),
    "7d": ("Last 7 days", timedelta(days=7), "day"),
    "30d": ("Last 30 days", timedelta(days=30), "day"),
}
GROUPS: dict[str, str] = {
    "model": "Model",
    "project": "Project",
    "team": "Team",
    "key": "Key",
    "user": "End user",
    "tag": "Tag",
}
CHART_W, CHART_H = 960, 180


def _buckets(start: datetime, end: datetime, bucket: str) -> list[str]:
    """Every bucket label between start and end, so days without traffic show as empty bars."""
    step = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    fmt = "%Y-%m-%dT%H" if bucket == "hour" else "%Y-%m-%d"
    t = start.replace(minute=0, second=0, microsecond=0)
    if bucket == "day":
        t = t.replace(hour=0)
    out = []
    while t < end:
        out.append(t.strftime(fmt))
        t += step
    return out


def spend_chart(series: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Bar geometry for the spend-over-time SVG (attributes, not styles: the CSP forbids inline styles)."""
    by = {r["group"]: r for r in series}
    values = [float(by[b]["cost_usd"]) if b in by else 0.0 for b in labels]
    requests = [int(by[b]["requests"]) if b in by else 0 for b in labels]
    top = max(values, default=0.0)
    n = max(1, len(labels))
    slot = CHART_W / n
    bars = []
    for i, (label, v, reqs) in enumerate(zip(labels, values, requests, strict=True)):
        h = 0.0 if top <= 0 else max(1.5 if v > 0 else 0.0, (v / top) * (CHART_H - 8))
        bars.append(
            {
                "x": round(i * slot + slot * 0.12, 2),
                "y": round(CHART_H - h, 2),
                "w": round(slot * 0.76, 2),
                "h": round(h, 2),
                "label": label,
                "cost": v,
                "requests": reqs,
            }
        )
    step = max(1, n // 8)
    ticks = [
        {
            "x": round(i * slot + slot / 2, 2),
            "label": labels[i][5:] if len(labels[i]) <= 10 else labels[i][11:] + "h",
        }
        for i in range(0, n, step)
    ]
    return {"bars": bars, "ticks": ticks, "max": top, "width": CHART_W, "height": CHART_H}


async def _budgets(state: Any, p: Principal) -> list[dict[str, Any]]:
    """Every budget the caller may see, with its current period's spend from the gateway's ledger."""
    store = state.store
    project_id = None if p.is_master else p.project_id
    keys = await run_in_threadpool(store.list_keys, project_id, False)
    teams = await run_in_threadpool(store.list_teams, project_id)
    found: list[tuple[str, str, str, dict[str, Any]]] = []  # (kind, scope id, label, limits)
    projects_seen: set[str] = set()
    for k in keys:
        if k.limits:
            found.append(("key", k.id, f"{k.name} ({k.key_prefix}…)", k.limits))
        if k.project_limits and k.project_id not in projects_seen:
            projects_seen.add(k.project_id)
            found.append(("project", k.project_id, k.project_name, k.project_limits))
    for t in teams:
        if t.get("limits"):
            found.append(("team", t["id"], t["name"], t["limits"]))
    out = []
    for kind, ident, label, limits in found:
        if limits.get("budget_usd") is None:
            continue
        period = str(limits.get("budget_period") or "monthly")
        if period not in PERIODS:
            continue
        budget = Budget(
            f"{kind}:{ident}",
            limit_usd=float(limits["budget_usd"]),
            period=period,
            soft_limit_usd=limits.get("soft_budget_usd"),
        )
        st = await state.gateway.ledger.status(budget)
        limit = float(st["limit"])
        used = float(st["spent"]) + float(st["reserved"])
        out.append(
            {
                "kind": kind,
                "label": label,
                "period": period,
                "limit": limit,
                "soft": st.get("soft_limit"),
                "spent": float(st["spent"]),
                "reserved": float(st["reserved"]),
                "remaining": float(st["remaining"]),
                "share": 0.0 if limit <= 0 else min(1.0, used / limit),
                "period_end": st.get("period_end"),
            }
        )
    out.sort(key=lambda b: -b["share"])
    return out


def build(ui: UIContext) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/cost")
    async def cost(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        state = ui.state(request)
        store = state.store
        q = request.query_params
        rng = q.get("range", "7d")
        if rng not in RANGES:
            rng = "7d"
        by = q.get("by", "model")
        if by not in GROUPS or (by == "project" and not p.is_master):
            by = "model"
        projects: list[dict[str, Any]] = await run_in_threadpool(store.list_projects) if p.is_master else []
        project_id = (q.get("project") or None) if p.is_master else p.project_id
        if p.is_master and project_id and project_id not in {x["id"] for x in projects}:
            project_id = None
        end = utcnow()
        _, span, bucket = RANGES[rng]
        start = end - span

        def load() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
            series = store.usage(bucket, project_id=project_id, start=start, end=end)
            rows = store.usage(by, project_id=project_id, start=start, end=end)
            totals = store.usage("project", project_id=project_id, start=start, end=end)
            return series, rows, totals

        series, rows, per_project = await run_in_threadpool(load)
        totals = {
            k: sum(r[k] for r in per_project)
            for k in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "unpriced")
        }
        names: dict[str, str] = {}
        if by == "project":
            names = {x["id"]: x["name"] for x in projects}
        elif by == "key":
            keys = await run_in_threadpool(store.list_keys, project_id)
            names = {k.id: f"{k.name} ({k.key_prefix}…)" for k in keys}
        elif by == "team":
            names = {t["id"]: t["name"] for t in await run_in_threadpool(store.list_teams, project_id)}
        top = max((r["cost_usd"] for r in rows), default=0.0)
        breakdown = [
            {
                **r,
                "label": names.get(r["group"], r["group"]) if r["group"] is not None else "(none)",
                "share": 0.0 if top <= 0 else r["cost_usd"] / top,
            }
            for r in rows[:100]
        ]
        params = {"range": rng, "by": by, **({"project": project_id} if p.is_master and project_id else {})}

        def url(**changes: str | None) -> str:
            merged = {k: v for k, v in {**params, **changes}.items() if v}
            return "/cost?" + urlencode(merged)

        return ui.render(
            request,
            "cost.html",
            who=ui.who(request, p),
            rng=rng,
            ranges=[(k, v[0]) for k, v in RANGES.items()],
            by=by,
            groups=[(k, v) for k, v in GROUPS.items() if k != "project" or p.is_master],
            group_label=GROUPS[by],
            projects=projects,
            project_id=project_id,
            totals=totals,
            chart=spend_chart(series, _buckets(start, end, bucket)),
            bucket=bucket,
            breakdown=breakdown,
            budgets=await _budgets(state, p),
            url=url,
            now=datetime.now(UTC),
        )

    return router
