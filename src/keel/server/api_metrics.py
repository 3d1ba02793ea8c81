"""/api/metrics: the dashboards' numbers (requests, errors, latency, TTFT, tokens, cost, scores) as JSON.

The web UI's dashboards page renders the same queries (keel.store.metrics), so the charts and
these routes agree. A virtual key sees its own project; the master key every project, or one
with ``project``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from keel.server.api import principal_from_request
from keel.store import iso, utcnow
from keel.store.metrics import INTERVALS, METRICS, Metrics, MetricsError
from keel.types import Principal

__all__ = ["build_router"]

Caller = Annotated[Principal, Depends(principal_from_request)]

_APPROX = (
    "Totals and the model, prompt_version and tag breakdowns come from per-minute/hour/day rollups kept by "
    "the trace writer; user and session breakdowns from hour/day rollups, with the traces table for the "
    "partial hours at the range's edges. Counts, tokens and cost are exact; latency percentiles are "
    "estimated from a log-scale histogram (two buckets per doubling, interpolated inside the bucket: "
    "typically within a few percent, at worst a factor of 1.41). A request (trace) counts in the minute it "
    "started; the range is widened to whole minutes (summary; whole hours where old minute rollups were "
    "pruned) or whole intervals (time series)."
)
_GROUP_BY = "^(model|user|session|tag|prompt_version)$"
_INTERVAL = "^(" + "|".join(INTERVALS) + ")$"
_METRIC = "^(" + "|".join(METRICS) + ")$"
StartQ = Annotated[
    str | None, Query(description="ISO 8601 (UTC when no offset); default: 24 hours before end")
]
EndQ = Annotated[str | None, Query(description="ISO 8601 (UTC when no offset); default: now")]
ProjectQ = Annotated[
    str | None, Query(description="Project id or name (master key only; a virtual key sees its own)")
]


class MetricValues(BaseModel):
    requests: int = Field(description="Traces (requests) that started in the range")
    errors: int = Field(description="Of those, traces with an error status")
    error_rate: float | None = Field(description="errors / requests; null without requests")
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float = Field(description="Sum of the known costs (unpriced calls add nothing)")
    latency_avg_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttft_avg_ms: float | None = Field(
        description="Mean time to first token of streamed LLM calls; null without any"
    )


class MetricGroup(MetricValues):
    group: str | None = Field(
        description="The model, user, session, tag or prompt `name@version`; null: none"
    )


class MetricsSummary(BaseModel):
    start: str
    end: str
    group_by: str | None
    totals: MetricValues
    groups: list[MetricGroup] = Field(description="The top groups by requests (empty without group_by)")


class TimePoint(BaseModel):
    t: str = Field(description="Start of the bucket (UTC)")
    value: float | None = Field(description="null where the metric is undefined (no requests)")


class Series(BaseModel):
    group: str | None
    points: list[TimePoint]


class MetricsTimeseries(BaseModel):
    metric: str
    interval: str
    group_by: str | None
    start: str
    end: str
    series: list[Series] = Field(description="One series, or one per top group with group_by")


class ScorePoint(BaseModel):
    t: str
    count: int
    avg: float | None


class ScoreGroup(BaseModel):
    group: str | None
    count: int
    avg: float | None


class ScoreStats(BaseModel):
    name: str
    data_type: str = Field(description="numeric | boolean | categorical")
    count: int
    avg: float | None = Field(description="Mean value (booleans as 0/1); null for categorical scores")
    min: float | None
    max: float | None
    labels: dict[str, int] = Field(description="Counts per label of a categorical score")
    points: list[ScorePoint]
    groups: list[ScoreGroup]


class MetricsScores(BaseModel):
    start: str
    end: str
    interval: str
    group_by: str | None
    scores: list[ScoreStats]


def _bad(message: str, code: str = "invalid_parameter") -> HTTPException:
    return HTTPException(400, detail={"message": message, "type": "invalid_request_error", "code": code})


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"'{name}' must be an ISO 8601 time", "invalid_time") from None
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo is not None else dt


def _range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    e = _parse_time(end, "end") or utcnow()
    s = _parse_time(start, "start") or e - timedelta(hours=24)
    if e <= s:
        raise _bad("'end' must be after 'start'", "invalid_time")
    return s, e


def _scope(request: Request, p: Principal, project: str | None) -> str | None:
    if not p.is_master:
        return p.project_id
    if not project:
        return None
    proj = request.app.state.keel.store.get_project(project)
    if proj is None:
        raise HTTPException(
            404,
            detail={
                "message": f"project {project!r} not found",
                "type": "invalid_request_error",
                "code": "not_found",
            },
        )
    return str(proj["id"])


def _metrics(request: Request) -> Metrics:
    return Metrics(request.app.state.keel.store.engine)


def _times(out: dict[str, Any]) -> dict[str, Any]:
    out["start"], out["end"] = iso(out["start"]), iso(out["end"])
    return out


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api/metrics", tags=["metrics"])

    @r.get(
        "/summary",
        response_model=MetricsSummary,
        summary="Totals over a time range, optionally broken down",
        description="Requests, errors, latency percentiles, TTFT, tokens and cost. " + _APPROX,
    )
    def summary(
        request: Request,
        p: Caller,
        start: StartQ = None,
        end: EndQ = None,
        project: ProjectQ = None,
        group_by: Annotated[str | None, Query(pattern=_GROUP_BY, description="Breakdown dimension")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="How many groups (the busiest)")] = 10,
    ) -> dict[str, Any]:
        s, e = _range(start, end)
        pid = _scope(request, p, project)
        try:
            out = _metrics(request).summary(start=s, end=e, project_id=pid, group_by=group_by, limit=limit)
        except MetricsError as exc:
            raise _bad(str(exc)) from None
        return _times(out)

    @r.get(
        "/timeseries",
        response_model=MetricsTimeseries,
        summary="One metric over time, optionally per group",
        description=(
            "Buckets are aligned to multiples of the interval (UTC) and all present: zero requests, "
            "or a null value for ratios, averages and percentiles, where nothing happened. " + _APPROX
        ),
    )
    def timeseries(
        request: Request,
        p: Caller,
        metric: Annotated[str, Query(pattern=_METRIC, description="What to plot")] = "requests",
        interval: Annotated[
            str | None, Query(pattern=_INTERVAL, description="Bucket width; default: at most 200 points")
        ] = None,
        start: StartQ = None,
        end: EndQ = None,
        project: ProjectQ = None,
        group_by: Annotated[str | None, Query(pattern=_GROUP_BY, description="One series per group")] = None,
        limit: Annotated[int, Query(ge=1, le=20, description="How many groups (the busiest)")] = 5,
    ) -> dict[str, Any]:
        s, e = _range(start, end)
        pid = _scope(request, p, project)
        try:
            out = _metrics(request).timeseries(
                start=s, end=e, interval=interval, project_id=pid, group_by=group_by, limit=limit
            )
        except MetricsError as exc:
            raise _bad(str(exc)) from None
        out["metric"] = metric
        out["series"] = [
            {
                "group": sr["group"],
                "points": [{"t": iso(pt["t"]), "value": pt[metric]} for pt in sr["points"]],
            }
            for sr in out["series"]
        ]
        return _times(out)

    @r.get("/scores", response_model=MetricsScores, summary="Scores per name: mean, labels, over time")
    def scores(
        request: Request,
        p: Caller,
        name: Annotated[str | None, Query(description="One score name; default: every name")] = None,
        interval: Annotated[
            str | None, Query(pattern=_INTERVAL, description="Bucket width; default: at most 200 points")
        ] = None,
        start: StartQ = None,
        end: EndQ = None,
        project: ProjectQ = None,
        group_by: Annotated[
            str | None,
            Query(pattern="^(model|prompt_version)$", description="Mean per model or prompt version"),
        ] = None,
    ) -> dict[str, Any]:
        """Scores placed in time by when they were created; numeric and boolean (0/1) scores are averaged,
        categorical ones counted per label."""
        s, e = _range(start, end)
        pid = _scope(request, p, project)
        try:
            out = _metrics(request).scores(
                start=s, end=e, interval=interval, project_id=pid, name=name, group_by=group_by
            )
        except MetricsError as exc:
            raise _bad(str(exc)) from None
        for item in out["scores"]:
            item["points"] = [{**pt, "t": iso(pt["t"])} for pt in item["points"]]
        return _times(out)

    return r
