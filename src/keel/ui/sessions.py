"""Session and end-user pages: lists by last activity, a session as its conversation, a user's history.

The numbers come from the same store queries as ``/api/sessions`` and ``/api/users``; a virtual
key sees its own project only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from keel.store import TraceFilter
from keel.store.sessions import GroupFilter, get_session, get_user, list_sessions, list_users
from keel.ui.context import UIContext

__all__ = ["build"]

PAGE = 50
TURNS = 100
MAX_ID = 256  # session and user ids are at most this long in the store


def _clean(value: str | None) -> str:
    return (value or "").replace("\x00", "").strip()


def _url(path: str, **params: str | None) -> str:
    clean = {k: v for k, v in params.items() if v}
    return path + ("?" + urlencode(clean) if clean else "")


def build(ui: UIContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def projects_for(request: Request, is_master: bool) -> list[dict[str, Any]]:
        return ui.state(request).store.list_projects() if is_master else []

    @r.get("/sessions")
    async def sessions(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = ui.state(request).store
        user = _clean(request.query_params.get("user"))[:MAX_ID]
        project = _clean(request.query_params.get("project")) if p.is_master else ""
        cursor = _clean(request.query_params.get("cursor")) or None
        f = GroupFilter(project_id=project or ui.scope(p), user=user or None)
        notices = []
        try:
            rows, nxt = await run_in_threadpool(list_sessions, store.engine, f, limit=PAGE, cursor=cursor)
        except ValueError:
            notices.append("That page link is no longer valid; showing the most recent sessions.")
            cursor = None
            rows, nxt = await run_in_threadpool(list_sessions, store.engine, f, limit=PAGE)
        return ui.render(
            request,
            "sessions.html",
            who=ui.who(request, p),
            rows=rows,
            user=user,
            project=project,
            projects=await run_in_threadpool(projects_for, request, p.is_master),
            notices=notices,
            cursor=cursor,
            newest_url=_url("/sessions", user=user, project=project) if cursor else None,
            older_url=_url("/sessions", user=user, project=project, cursor=nxt) if nxt else None,
            now=datetime.now(UTC),
        )

    @r.get("/sessions/{session_id:path}")
    async def session(request: Request, session_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = ui.state(request).store
        cursor = _clean(request.query_params.get("cursor")) or None
        s = None
        if 0 < len(session_id) <= MAX_ID:
            try:
                s = await run_in_threadpool(
                    get_session, store.engine, session_id, ui.scope(p), limit=TURNS, cursor=cursor
                )
            except ValueError:
                s = await run_in_threadpool(get_session, store.engine, session_id, ui.scope(p), limit=TURNS)
        if s is None:
            return ui.render(
                request,
                "group_not_found.html",
                status=404,
                who=ui.who(request, p),
                what="session",
                ident=session_id,
            )
        here = "/sessions/" + quote(session_id, safe="")
        return ui.render(
            request,
            "session.html",
            who=ui.who(request, p),
            s=s,
            more_url=_url(here, cursor=s["next_cursor"]) if s["next_cursor"] else None,
            first_url=here if cursor else None,
            now=datetime.now(UTC),
        )

    @r.get("/users")
    async def users(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = ui.state(request).store
        project = _clean(request.query_params.get("project")) if p.is_master else ""
        cursor = _clean(request.query_params.get("cursor")) or None
        f = GroupFilter(project_id=project or ui.scope(p))
        notices = []
        try:
            rows, nxt = await run_in_threadpool(list_users, store.engine, f, limit=PAGE, cursor=cursor)
        except ValueError:
            notices.append("That page link is no longer valid; showing the most recent users.")
            cursor = None
            rows, nxt = await run_in_threadpool(list_users, store.engine, f, limit=PAGE)
        return ui.render(
            request,
            "users.html",
            who=ui.who(request, p),
            rows=rows,
            project=project,
            projects=await run_in_threadpool(projects_for, request, p.is_master),
            notices=notices,
            cursor=cursor,
            newest_url=_url("/users", project=project) if cursor else None,
            older_url=_url("/users", project=project, cursor=nxt) if nxt else None,
            now=datetime.now(UTC),
        )

    @r.get("/users/{user_id:path}")
    async def user(request: Request, user_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = ui.state(request).store
        pid = ui.scope(p)

        def load() -> dict[str, Any] | None:
            u = get_user(store.engine, user_id, pid)
            if u is None:
                return None
            u["traces"], u["more_traces"] = store.list_traces(
                TraceFilter(project_id=pid, user=user_id), limit=20
            )
            u["sessions"], u["more_sessions"] = list_sessions(
                store.engine, GroupFilter(project_id=pid, user=user_id), limit=20
            )
            return u

        u = await run_in_threadpool(load) if 0 < len(user_id) <= MAX_ID else None
        if u is None:
            return ui.render(
                request,
                "group_not_found.html",
                status=404,
                who=ui.who(request, p),
                what="user",
                ident=user_id,
            )
        return ui.render(
            request,
            "user.html",
            who=ui.who(request, p),
            u=u,
            traces_url=_url("/traces", user=user_id),
            sessions_url=_url("/sessions", user=user_id),
            now=datetime.now(UTC),
        )

    return r
