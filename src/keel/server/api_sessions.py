"""/api/sessions and /api/users: traces grouped by session and by end user.

A virtual key sees its own project only; the master key sees every project (or one, with ``project``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from keel.server.api import Caller, TraceOut, _parse_time, _project_id
from keel.store import TraceFilter
from keel.store.sessions import GroupFilter, get_session, get_user, list_sessions, list_users
from keel.types import Principal

__all__ = ["build_router"]


class _GroupTotals(BaseModel):
    trace_count: int
    first_time: str | None
    last_time: str | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float | None = Field(description="Sum over the priced traces; null when none was priced.")
    errors: int = Field(description="Traces that ended in an error.")


class SessionOut(_GroupTotals):
    session_id: str
    user: str | None = Field(description="The session's end user (the greatest id when several).")


class SessionPage(BaseModel):
    data: list[SessionOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class SessionTurnOut(TraceOut):
    input_text: str | None = Field(description="The last user message of the trace's first LLM call.")
    output_text: str | None = Field(description="The reply text of the trace's last LLM call.")


class SessionDetail(SessionOut):
    traces: list[SessionTurnOut] = Field(description="The session's traces, oldest first: the conversation.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the following traces.")


class EndUserOut(_GroupTotals):
    user: str
    session_count: int


class EndUserPage(BaseModel):
    data: list[EndUserOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class EndUserModelUse(BaseModel):
    model: str
    trace_count: int


class EndUserDetail(EndUserOut):
    models: list[EndUserModelUse] = Field(description="Models the user's traces called, busiest first.")
    traces: list[TraceOut] = Field(description="The user's newest traces.")
    sessions: list[SessionOut] = Field(description="The user's most recently active sessions.")


def _bad(message: str, code: str, status: int = 400) -> HTTPException:
    return HTTPException(status, detail={"message": message, "type": "invalid_request_error", "code": code})


def _scope(store: Any, p: Principal, project: str | None) -> str | None:
    if not p.is_master:
        return p.project_id
    return _project_id(store, project) if project else None


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api", tags=["sessions"])

    @r.get("/sessions", response_model=SessionPage, summary="Sessions, most recently active first")
    async def sessions(
        request: Request,
        p: Caller,
        user: str | None = None,
        start: Annotated[str | None, Query(description="ISO 8601; count traces starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; count traces starting before")] = None,
        project: str | None = Query(default=None, description="Project id or name (master key only)"),
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        f = GroupFilter(
            project_id=_scope(store, p, project),
            user=user or None,
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        try:
            rows, nxt = await run_in_threadpool(list_sessions, store.engine, f, limit=limit, cursor=cursor)
        except ValueError:
            raise _bad("invalid cursor", "invalid_cursor") from None
        return {"data": rows, "next_cursor": nxt}

    @r.get(
        "/sessions/{session_id:path}",
        response_model=SessionDetail,
        summary="One session: totals and its traces in order, each with its turn",
    )
    async def session(
        request: Request,
        session_id: str,
        p: Caller,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        try:
            out = await run_in_threadpool(
                get_session,
                store.engine,
                session_id,
                None if p.is_master else p.project_id,
                limit=limit,
                cursor=cursor,
            )
        except ValueError:
            raise _bad("invalid cursor", "invalid_cursor") from None
        if out is None:
            raise _bad(f"session {session_id!r} not found", "not_found", 404)
        return out

    @r.get("/users", response_model=EndUserPage, summary="End users, most recently seen first")
    async def users(
        request: Request,
        p: Caller,
        start: Annotated[str | None, Query(description="ISO 8601; count traces starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; count traces starting before")] = None,
        project: str | None = Query(default=None, description="Project id or name (master key only)"),
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        f = GroupFilter(
            project_id=_scope(store, p, project),
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        try:
            rows, nxt = await run_in_threadpool(list_users, store.engine, f, limit=limit, cursor=cursor)
        except ValueError:
            raise _bad("invalid cursor", "invalid_cursor") from None
        return {"data": rows, "next_cursor": nxt}

    @r.get(
        "/users/{user_id:path}",
        response_model=EndUserDetail,
        summary="One end user: totals, models, newest traces and sessions",
    )
    async def user(request: Request, user_id: str, p: Caller) -> dict[str, Any]:
        store = request.app.state.keel.store
        pid = None if p.is_master else p.project_id

        def load() -> dict[str, Any] | None:
            out = get_user(store.engine, user_id, pid)
            if out is None:
                return None
            out["traces"], _ = store.list_traces(TraceFilter(project_id=pid, user=user_id), limit=20)
            out["sessions"], _ = list_sessions(
                store.engine, GroupFilter(project_id=pid, user=user_id), limit=20
            )
            return out

        found = await run_in_threadpool(load)
        if found is None:
            raise _bad(f"user {user_id!r} not found", "not_found", 404)
        return found

    return r
