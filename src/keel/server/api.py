"""The JSON management API under /api (keys, projects, traces), described at /openapi.json."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, field_validator

from keel.gateway.auth import bearer_token
from keel.gateway.limits import check_limits
from keel.server.access import check_method, require_project, require_write
from keel.store import TraceFilter
from keel.store.scores import trace_scores
from keel.store.search import parse_query
from keel.types import Principal

__all__ = ["build_api_router", "principal_from_request"]


class KeyCreate(BaseModel):
    project: str = Field(default="default", description="Project name or id (created when missing).")
    name: str = Field(default="default", min_length=1, max_length=200)
    models: list[str] | None = Field(
        default=None, description="Allowed model names; null allows every model."
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Tags for cost attribution (feature, route, customer)."
    )
    team: str | None = Field(
        default=None, description="Team name or id in the project (created when missing)."
    )
    user: str | None = Field(
        default=None, description="End user the key's requests are attributed to by default."
    )
    limits: dict[str, Any] | None = Field(default=None, description="Rate limits and budgets of this key.")
    kind: Literal["secret", "public"] = Field(
        default="secret",
        description="`public`: a pk-keel- key that may only post end-user feedback (safe in a browser).",
    )
    scopes: list[Literal["gateway", "ingest", "read", "admin"]] | None = Field(
        default=None,
        description="What the key may do: gateway (model calls), ingest (OTLP, scores), read (GET /api), "
        "admin (manage its project's keys, prompts, datasets, ...). Default: gateway, ingest, read.",
    )

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_limits(v, "key")


class TeamCreate(BaseModel):
    project: str = Field(default="default", description="Project name or id (created when missing).")
    name: str = Field(min_length=1, max_length=200)
    limits: dict[str, Any] | None = Field(
        default=None,
        description="Rate limits and budgets shared by the team's keys; `models`: its allow-list.",
    )
    models: list[str] | None = Field(
        default=None, description="Models the team's keys may use (each key's own list narrows it further)."
    )

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_limits(v, "team")


class TeamOut(BaseModel):
    id: str
    project_id: str
    name: str
    limits: dict[str, Any]
    created_at: str | None


class UsageRow(BaseModel):
    group: str | None
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    unpriced: int


class UsageOut(BaseModel):
    group_by: str
    start: str | None
    end: str | None
    data: list[UsageRow]
    totals: UsageRow


class KeyOut(BaseModel):
    id: str
    project_id: str
    project: str
    team_id: str | None = None
    team: str | None = None
    user: str | None = None
    limits: dict[str, Any] = Field(default_factory=dict)
    name: str
    key_prefix: str
    models: list[str] | None
    metadata: dict[str, Any]
    created_at: str | None
    revoked_at: str | None
    status: str
    kind: str = "secret"
    scopes: list[str] = Field(default_factory=list)


class KeyCreated(KeyOut):
    key: str = Field(description="The secret key. Shown once; only its hash is stored.")


class ProjectCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    limits: dict[str, Any] | None = Field(
        default=None,
        description="Project budget/rate limits; user_* limits per end user; run_budget_usd and run_max_calls "
        "for agent runs.",
    )

    @field_validator("limits")
    @classmethod
    def _limits(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_limits(v, "project")


class ProjectOut(BaseModel):
    id: str
    name: str
    created_at: str | None


class SpanOut(BaseModel):
    span_id: str
    trace_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_time: str | None
    end_time: str | None
    latency_ms: float
    ttft_ms: float | None
    status: str
    status_code: int | None
    error: str | None
    model: str | None
    requested_model: str | None
    provider: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int
    cost_usd: float | None
    priced: bool
    user: str | None
    prompt_name: str | None = None
    prompt_version: int | None = None
    input: Any
    output: Any
    attributes: dict[str, Any]


class TraceOut(BaseModel):
    trace_id: str
    project_id: str | None
    key_id: str | None
    name: str
    start_time: str | None
    end_time: str | None
    latency_ms: float
    status: str
    model: str | None
    provider: str | None
    user: str | None
    session_id: str | None
    tags: list[str]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float | None
    error: str | None
    span_count: int
    prompt_name: str | None = None
    prompt_version: int | None = None


class ScoreOut(BaseModel):
    id: str
    project_id: str | None
    trace_id: str
    span_id: str | None
    name: str
    data_type: str = Field(description="numeric | boolean | categorical")
    value: bool | float | str | None = Field(description="A number, a boolean or a category label.")
    source: str = Field(description="human | api | eval")
    comment: str | None
    author: str | None
    created_at: str | None


class TraceDetail(TraceOut):
    spans: list[SpanOut]
    scores: list[ScoreOut] = Field(default_factory=list)


class TracePage(BaseModel):
    data: list[TraceOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


def principal_from_request(request: Request) -> Principal:
    """Authenticate an /api request from its bearer key (memory only)."""
    keys = request.app.state.keel.keys
    key = bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if key is None:
        raise HTTPException(
            401,
            detail={"message": "missing API key", "type": "authentication_error", "code": "missing_api_key"},
        )
    p = keys.lookup_any(key)
    if p is None:
        raise HTTPException(
            401,
            detail={"message": "invalid API key", "type": "authentication_error", "code": "invalid_api_key"},
        )
    if p.is_public:
        raise HTTPException(
            403,
            detail={
                "message": "a public key (pk-keel-) may only post end-user feedback",
                "type": "permission_error",
                "code": "public_key",
            },
        )
    check_method(p, request.method)  # reads need the read scope; writes a principal that may write
    return p


Caller = Annotated[Principal, Depends(principal_from_request)]


async def _audit(
    request: Request,
    p: Principal,
    action: str,
    target: str | None,
    project_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append an administrative action to the hash-chained audit log."""
    from keel.store import audit

    await run_in_threadpool(
        audit.record,
        request.app.state.keel.store,
        actor=audit.actor_of(p),
        action=action,
        target=target,
        project_id=project_id,
        details=details,
    )


def _require_admin(p: Principal) -> None:
    if not p.is_master:
        raise HTTPException(
            403,
            detail={
                "message": "this action needs the master key",
                "type": "permission_error",
                "code": "forbidden",
            },
        )


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(
            400,
            detail={
                "message": f"'{name}' must be an ISO 8601 time",
                "type": "invalid_request_error",
                "code": "invalid_time",
            },
        ) from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def _project_id(store: Any, ref: str) -> str:
    proj = store.get_project(ref)
    if proj is None:
        raise HTTPException(
            404,
            detail={
                "message": f"project {ref!r} not found",
                "type": "invalid_request_error",
                "code": "not_found",
            },
        )
    return str(proj["id"])


def build_api_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/keys", response_model=list[KeyOut], tags=["keys"], summary="List virtual keys")
    def list_keys(request: Request, p: Caller, project: str | None = None) -> list[dict[str, Any]]:
        require_write(p, "keys")
        store = request.app.state.keel.store
        pid = None if p.is_master else p.project_id
        if project:
            proj = store.get_project(project)
            if proj is None:
                raise HTTPException(
                    404,
                    detail={
                        "message": f"project {project!r} not found",
                        "type": "invalid_request_error",
                        "code": "not_found",
                    },
                )
            require_project(p, proj["id"])
            pid = proj["id"]
        return [k.public() for k in store.list_keys(project_id=pid)]

    @r.post(
        "/keys",
        response_model=KeyCreated,
        status_code=201,
        tags=["keys"],
        summary="Create a virtual key (shown once)",
    )
    async def create_key(request: Request, body: KeyCreate, p: Caller) -> dict[str, Any]:
        require_write(p, "keys")
        keel = request.app.state.keel
        if not p.is_master:  # a project admin makes keys in its own project only
            proj = await run_in_threadpool(keel.store.get_project, body.project)
            require_project(p, proj["id"] if proj else None)
        if body.kind == "public" and body.scopes:
            raise HTTPException(
                400,
                detail={
                    "message": "a public key has no scopes: it may only post end-user feedback",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                },
            )
        if body.kind == "public" and (body.models or body.team or body.user or body.limits):
            raise HTTPException(
                400,
                detail={
                    "message": "a public key takes only project, name and metadata",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                },
            )
        secret, row = await run_in_threadpool(
            keel.store.create_key,
            body.project,
            body.name,
            body.models,
            body.metadata,
            body.team,
            body.user,
            body.limits,
            body.kind,
            body.scopes,
        )
        await keel.keys.changed()
        await _audit(
            request,
            p,
            "key.create",
            row.id,
            row.project_id,
            {
                "name": row.name,
                "kind": body.kind,
                "models": body.models,
                "team": body.team,
                "limits": body.limits,
                "scopes": row.public()["scopes"],
            },
        )
        return {**row.public(), "key": secret}

    @r.delete("/keys/{key_id}", response_model=KeyOut, tags=["keys"], summary="Revoke a virtual key")
    async def revoke_key(request: Request, key_id: str, p: Caller) -> dict[str, Any]:
        require_write(p, "keys")
        keel = request.app.state.keel
        found = await run_in_threadpool(keel.store.get_key, key_id)
        row = None
        if found is not None and (p.is_master or found.project_id == p.project_id):
            row = await run_in_threadpool(keel.store.revoke_key, key_id)
        if row is None:
            raise HTTPException(
                404,
                detail={
                    "message": f"key {key_id!r} not found",
                    "type": "invalid_request_error",
                    "code": "not_found",
                },
            )
        await keel.keys.changed()
        await _audit(request, p, "key.revoke", row.id, row.project_id, {"name": row.name})
        return row.public()

    @r.get("/projects", response_model=list[ProjectOut], tags=["projects"])
    def list_projects(request: Request, p: Caller) -> list[dict[str, Any]]:
        store = request.app.state.keel.store
        projects: list[dict[str, Any]] = store.list_projects()
        return projects if p.is_master else [x for x in projects if x["id"] == p.project_id]

    @r.post("/projects", response_model=ProjectOut, status_code=201, tags=["projects"])
    async def create_project(request: Request, body: ProjectCreate, p: Caller) -> dict[str, Any]:
        _require_admin(p)
        store = request.app.state.keel.store
        pid = await run_in_threadpool(store.ensure_project, body.name)
        if body.limits is not None:
            await run_in_threadpool(store.set_project_limits, pid, body.limits)
            await request.app.state.keel.keys.changed()
        proj: dict[str, Any] = await run_in_threadpool(store.get_project, body.name)
        await _audit(
            request, p, "project.upsert", proj["id"], proj["id"], {"name": body.name, "limits": body.limits}
        )
        return proj

    @r.get("/teams", response_model=list[TeamOut], tags=["teams"], summary="List teams")
    def list_teams(request: Request, p: Caller, project: str | None = None) -> list[dict[str, Any]]:
        store = request.app.state.keel.store
        pid = p.project_id if not p.is_master else (_project_id(store, project) if project else None)
        teams: list[dict[str, Any]] = store.list_teams(pid)
        return teams

    @r.post(
        "/teams", response_model=TeamOut, status_code=201, tags=["teams"], summary="Create or update a team"
    )
    async def create_team(request: Request, body: TeamCreate, p: Caller) -> dict[str, Any]:
        require_write(p, "teams")
        keel = request.app.state.keel
        store = keel.store
        proj = await run_in_threadpool(store.get_project, body.project)
        if not p.is_master:  # a project admin changes its own project's teams only
            require_project(p, proj["id"] if proj else None)
        pid = proj["id"] if proj else await run_in_threadpool(store.ensure_project, body.project)
        limits = body.limits
        if body.models is not None:
            limits = {**(limits or {}), "models": body.models}
        team: dict[str, Any] = await run_in_threadpool(store.ensure_team, pid, body.name, limits)
        await _audit(request, p, "team.upsert", team["id"], pid, {"name": body.name, "limits": limits})
        await keel.keys.changed()  # keys of the team pick up its limits
        return team

    @r.get("/usage", response_model=UsageOut, tags=["usage"], summary="Spend, tokens and requests, grouped")
    def usage(
        request: Request,
        p: Caller,
        group_by: Annotated[
            str, Query(pattern="^(project|team|key|user|model|provider|tag|prompt|prompt_version|day|hour)$")
        ] = "model",
        start: Annotated[str | None, Query(description="ISO 8601; calls starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; calls starting before")] = None,
        project: str | None = Query(default=None, description="Project id or name (master key only)"),
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        pid = p.project_id if not p.is_master else (_project_id(store, project) if project else None)
        rows = store.usage(
            group_by, project_id=pid, start=_parse_time(start, "start"), end=_parse_time(end, "end")
        )
        totals = {
            "group": None,
            **{
                k: sum(r[k] for r in rows)
                for k in ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", "unpriced")
            },
        }
        if (
            group_by == "tag"
        ):  # a call with several tags counts once per tag: totals come from the ungrouped query
            base = store.usage(
                "project", project_id=pid, start=_parse_time(start, "start"), end=_parse_time(end, "end")
            )
            totals = {"group": None, **{k: sum(r[k] for r in base) for k in totals if k != "group"}}
        return {"group_by": group_by, "start": start, "end": end, "data": rows, "totals": totals}

    @r.get("/traces", response_model=TracePage, tags=["traces"], summary="List traces, newest first")
    def list_traces(
        request: Request,
        p: Caller,
        model: str | None = None,
        status: Annotated[str | None, Query(pattern="^(ok|error)$")] = None,
        user: str | None = None,
        session: str | None = None,
        tag: str | None = None,
        prompt: str | None = Query(default=None, description="Registry prompt name"),
        prompt_version: Annotated[int | None, Query(ge=1, description="Version of `prompt`")] = None,
        start: Annotated[str | None, Query(description="ISO 8601; traces starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; traces starting before")] = None,
        project: str | None = Query(default=None, description="Project id (master key only)"),
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
        name: str | None = Query(default=None, description="Trace (root span) name"),
        key: str | None = Query(default=None, description="Virtual key id"),
        team: str | None = Query(default=None, description="Team id"),
        provider: str | None = None,
        min_latency_ms: Annotated[float | None, Query(ge=0)] = None,
        max_latency_ms: Annotated[float | None, Query(ge=0)] = None,
        min_cost_usd: Annotated[float | None, Query(ge=0)] = None,
        max_cost_usd: Annotated[float | None, Query(ge=0)] = None,
        q: Annotated[
            str | None,
            Query(
                max_length=500,
                description="Full-text search over span input/output: every word must occur; `word*` is a prefix",
            ),
        ] = None,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        pid = p.project_id if not p.is_master else project
        if q is not None and q.strip():
            try:
                parse_query(q)
            except ValueError as exc:
                raise HTTPException(
                    400,
                    detail={"message": f"q: {exc}", "type": "invalid_request_error", "code": "invalid_query"},
                ) from None
        f = TraceFilter(
            name=name or None,
            key_id=key or None,
            team_id=team or None,
            provider=provider or None,
            min_latency_ms=min_latency_ms,
            max_latency_ms=max_latency_ms,
            min_cost_usd=min_cost_usd,
            max_cost_usd=max_cost_usd,
            q=q.strip() if q and q.strip() else None,
            project_id=pid,
            model=model,
            status=status,
            user=user,
            session=session,
            tag=tag,
            prompt_name=prompt,
            prompt_version=prompt_version,
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        try:
            rows, nxt = store.list_traces(f, limit=limit, cursor=cursor)
        except ValueError:
            raise HTTPException(
                400,
                detail={
                    "message": "invalid cursor",
                    "type": "invalid_request_error",
                    "code": "invalid_cursor",
                },
            ) from None
        return {"data": rows, "next_cursor": nxt}

    @r.get(
        "/traces/{trace_id}", response_model=TraceDetail, tags=["traces"], summary="One trace with its spans"
    )
    def get_trace(request: Request, trace_id: str, p: Caller) -> dict[str, Any]:
        store = request.app.state.keel.store
        t = store.get_trace(trace_id.lower(), project_id=None if p.is_master else p.project_id)
        if t is None:
            raise HTTPException(
                404,
                detail={
                    "message": f"trace {trace_id!r} not found",
                    "type": "invalid_request_error",
                    "code": "not_found",
                },
            )
        out: dict[str, Any] = t
        out["scores"] = trace_scores(store, t["trace_id"])
        return out

    return r
