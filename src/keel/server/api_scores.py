"""Scores on traces and spans (/api/scores) and end-user feedback from browsers (/api/public/feedback).

Feedback is posted with a *public* key (``pk-keel-``, created with ``POST /api/keys`` and
``"kind": "public"``): safe to ship in a web page because it can do nothing else. The route answers
CORS preflights for the configured origins and is rate-limited per key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from keel.errors import KeelError
from keel.gateway.auth import bearer_token
from keel.gateway.limits import Limit
from keel.server.access import require_write
from keel.server.api import Caller, ScoreOut, _parse_time, _project_id
from keel.store.scores import ScoreFilter, add_score, delete_score, list_scores
from keel.types import Principal

__all__ = ["FEEDBACK_SCORE", "build_router"]

FEEDBACK_SCORE = "user_feedback"
MAX_FEEDBACK_BYTES = 16 * 1024
_TRACE_ID = r"^[0-9a-fA-F]{32}$"
_SPAN_ID = r"^[0-9a-fA-F]{16}$"
_SCORE_NAME = r"^[A-Za-z0-9_.:\-]{1,100}$"


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace_id: str = Field(pattern=_TRACE_ID, description="The trace scored (32 hex digits).")
    span_id: str | None = Field(
        default=None, pattern=_SPAN_ID, description="A span of the trace, to score that span only."
    )
    name: str = Field(min_length=1, max_length=200, description="What is scored, e.g. `correctness`.")
    value: bool | float | str = Field(description="A number, a boolean or a category label.")
    data_type: Literal["numeric", "boolean", "categorical"] | None = Field(
        default=None, description="Inferred from `value` when omitted."
    )
    source: Literal["human", "api", "eval"] = "api"
    comment: str | None = Field(default=None, max_length=10_000)
    author: str | None = Field(
        default=None, max_length=256, description="Who scored (default: the key's id)."
    )


class ScorePage(BaseModel):
    data: list[ScoreOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace_id: str = Field(
        pattern=_TRACE_ID, description="The `x-keel-trace-id` header of the response the user rates."
    )
    value: Literal["up", "down"] | StrictBool = Field(
        description='"up"/true is thumbs up, "down"/false thumbs down.'
    )
    comment: str | None = Field(default=None, max_length=2000)
    span_id: str | None = Field(default=None, pattern=_SPAN_ID)
    name: str = Field(default=FEEDBACK_SCORE, pattern=_SCORE_NAME, description="Score name.")
    user: str | None = Field(default=None, max_length=256, description="The end user giving feedback.")


def _bad(message: str, code: str = "invalid_request") -> HTTPException:
    return HTTPException(400, detail={"message": message, "type": "invalid_request_error", "code": code})


def _not_found(message: str) -> HTTPException:
    return HTTPException(
        404, detail={"message": message, "type": "invalid_request_error", "code": "not_found"}
    )


def _typed_value(body: ScoreIn) -> tuple[str, float | bool | str]:
    """(data_type, value) with the value checked against the declared or inferred type."""
    v = body.value
    dtype = body.data_type or (
        "boolean" if isinstance(v, bool) else "categorical" if isinstance(v, str) else "numeric"
    )
    if dtype == "boolean":
        if isinstance(v, bool):
            return dtype, v
        if isinstance(v, float) and v in (0.0, 1.0):
            return dtype, v == 1.0
        raise _bad("value: a boolean score needs true or false")
    if dtype == "numeric":
        if isinstance(v, bool) or not isinstance(v, float):
            raise _bad("value: a numeric score needs a number")
        if v != v or v in (float("inf"), float("-inf")):
            raise _bad("value: a numeric score needs a finite number")
        return dtype, v
    if not isinstance(v, str) or not v or len(v) > 200:
        raise _bad("value: a categorical score needs a label of 1 to 200 characters")
    return dtype, v


# -- CORS for the feedback route -------------------------------------------------------------------


def _allowed_origin(request: Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None when its origin is not allowed."""
    raw = request.app.state.keel.settings.feedback_cors_origins or ""
    allowed = {o.strip().rstrip("/") for o in raw.split(",") if o.strip()}
    if "*" in allowed:
        return "*"
    origin = request.headers.get("origin")
    return origin if origin is not None and origin.rstrip("/") in allowed else None


def _cors_headers(request: Request) -> dict[str, str]:
    allow = _allowed_origin(request)
    if allow is None:
        return {}
    headers = {"access-control-allow-origin": allow, "access-control-expose-headers": "retry-after"}
    if allow != "*":
        headers["vary"] = "Origin"
    return headers


def _error(request: Request, status: int, message: str, etype: str, code: str, **extra: str) -> HTTPException:
    return HTTPException(
        status,
        detail={"message": message, "type": etype, "code": code},
        headers={**_cors_headers(request), **extra},
    )


def _feedback_principal(request: Request) -> Principal:
    """Any active key may post feedback; public keys may do nothing else."""
    key = bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))
    if key is None:
        raise _error(request, 401, "missing API key", "authentication_error", "missing_api_key")
    p: Principal | None = request.app.state.keel.keys.lookup_any(key)
    if p is None:
        raise _error(request, 401, "invalid API key", "authentication_error", "invalid_api_key")
    return p


async def _read_feedback(request: Request) -> FeedbackIn:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FEEDBACK_BYTES:
            raise _error(
                request, 413, "feedback body too large", "invalid_request_error", "request_too_large"
            )
    try:
        return FeedbackIn.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise _error(
            request, 400, "body must be a JSON object", "invalid_request_error", "invalid_json"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        raise _error(request, 400, msg, "invalid_request_error", "invalid_request") from None


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.post(
        "/scores", response_model=ScoreOut, status_code=201, tags=["scores"], summary="Score a trace or span"
    )
    async def create_score(request: Request, body: ScoreIn, p: Caller) -> dict[str, Any]:
        require_write(p, "scores")
        dtype, value = _typed_value(body)
        store = request.app.state.keel.store
        out = await run_in_threadpool(
            lambda: add_score(
                store,
                trace_id=body.trace_id.lower(),
                span_id=body.span_id.lower() if body.span_id else None,
                name=body.name,
                data_type=dtype,
                value=value,
                source=body.source,
                comment=body.comment,
                author=body.author or p.key_id or "master",
                project_id=None if p.is_master else p.project_id,
            )
        )
        if out is None:
            what = f"span {body.span_id!r} of trace" if body.span_id else "trace"
            raise _not_found(
                f"{what} {body.trace_id!r} not found (traces are written moments after the call; retry shortly)"
            )
        return out

    @r.get("/scores", response_model=ScorePage, tags=["scores"], summary="List scores, newest first")
    def get_scores(
        request: Request,
        p: Caller,
        trace_id: Annotated[str | None, Query(pattern=_TRACE_ID)] = None,
        span_id: Annotated[str | None, Query(pattern=_SPAN_ID)] = None,
        name: str | None = None,
        source: Annotated[str | None, Query(pattern="^(human|api|eval)$")] = None,
        data_type: Annotated[str | None, Query(pattern="^(numeric|boolean|categorical)$")] = None,
        start: Annotated[str | None, Query(description="ISO 8601; scores created at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; scores created before")] = None,
        project: str | None = Query(default=None, description="Project id or name (master key only)"),
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        pid = p.project_id if not p.is_master else (_project_id(store, project) if project else None)
        f = ScoreFilter(
            project_id=pid,
            trace_id=trace_id.lower() if trace_id else None,
            span_id=span_id.lower() if span_id else None,
            name=name,
            source=source,
            data_type=data_type,
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        try:
            rows, nxt = list_scores(store, f, limit=limit, cursor=cursor)
        except ValueError:
            raise _bad("invalid cursor", "invalid_cursor") from None
        return {"data": rows, "next_cursor": nxt}

    @r.delete("/scores/{score_id}", response_model=ScoreOut, tags=["scores"], summary="Delete a score")
    async def remove_score(request: Request, score_id: str, p: Caller) -> dict[str, Any]:
        require_write(p, "scores")
        store = request.app.state.keel.store
        out = await run_in_threadpool(delete_score, store, score_id, None if p.is_master else p.project_id)
        if out is None:
            raise _not_found(f"score {score_id!r} not found")
        return out

    @r.options("/public/feedback", include_in_schema=False)
    def feedback_preflight(request: Request) -> Response:
        allow = _allowed_origin(request)
        if allow is None:
            return JSONResponse(
                {
                    "error": {
                        "message": "origin not allowed",
                        "type": "permission_error",
                        "code": "cors_origin",
                    }
                },
                status_code=403,
            )
        return Response(
            status_code=204,
            headers={
                **_cors_headers(request),
                "access-control-allow-methods": "POST, OPTIONS",
                "access-control-allow-headers": "authorization, content-type, x-api-key",
                "access-control-max-age": "600",
            },
        )

    @r.post(
        "/public/feedback",
        response_model=ScoreOut,
        status_code=201,
        tags=["scores"],
        summary="End-user thumbs up/down on a trace (public key; CORS)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
            }
        },
    )
    async def post_feedback(request: Request) -> Response:
        keel = request.app.state.keel
        p = _feedback_principal(request)
        if keel.settings.feedback_rpm > 0:
            limit = Limit(f"feedback:{p.key_id or 'master'}", rpm=keel.settings.feedback_rpm)
            decision = await keel.gateway.limiter.check([limit], 0)
            try:
                decision.raise_if_denied()
            except KeelError as err:
                raise _error(request, err.status, err.message, err.type, err.code, **err.headers) from None
        body = await _read_feedback(request)
        up = body.value in ("up", True)
        store = keel.store
        out = await run_in_threadpool(
            lambda: add_score(
                store,
                trace_id=body.trace_id.lower(),
                span_id=body.span_id.lower() if body.span_id else None,
                name=body.name,
                data_type="boolean",
                value=up,
                source="human",
                comment=body.comment,
                author=body.user or p.key_id or "master",
                project_id=None if p.is_master else p.project_id,
            )
        )
        if out is None:
            raise _error(
                request,
                404,
                f"trace {body.trace_id!r} not found (traces are written moments after the call; retry shortly)",
                "invalid_request_error",
                "not_found",
            )
        return Response(
            orjson.dumps(ScoreOut.model_validate(out).model_dump()),
            status_code=201,
            media_type="application/json",
            headers=_cors_headers(request),
        )

    return r
