"""User sign-in for the UI: name + password sessions, failed-login limits, and the project switcher.

A session cookie holds a random token (only its SHA-256 is stored); each request maps it to a
:class:`~keel.types.Principal` carrying the user's role in the project being viewed, so every page
scopes itself exactly as it does for a key of that project.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from keel.gateway.limits import Limit
from keel.store import access, audit
from keel.types import Principal
from keel.ui.context import UIContext

__all__ = ["SESSION_COOKIE", "build", "password_login", "session_principal"]

SESSION_COOKIE = "keel_session"
SESSION_TTL = timedelta(days=7)
MAX_FAILED_LOGINS = 5  # per user name and client address, per rate-limit window
_UNLIMITED = 1 << 40


def session_principal(state: Any, token: str) -> Principal | None:
    """The principal of a live session token, or None (unknown, expired, revoked, user disabled)."""
    info = access.session_info(state.store, token)
    if info is None or info.project_id is None:  # no project (membership removed): no view at all
        return None
    return Principal(
        key_id=None,
        project_id=info.project_id,
        name=info.user_name,
        user_name=info.user_name,
        role=info.role,
        is_owner=info.is_owner,
        scopes=frozenset({"read"}),
    )


def projects_of(state: Any, token: str) -> list[dict[str, str]]:
    info = access.session_info(state.store, token)
    if info is None:
        return []
    return [{"id": pid, "name": name, "role": role} for pid, name, role in info.projects]


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


async def password_login(
    state: Any, request: Request, name: str, password: str
) -> tuple[str | None, str, int]:
    """Check a name and password: (session token, "", 303) or (None, error message, status).

    Failed attempts are counted per user name and client address in the gateway's limiter (shared
    through Redis when configured); past ``MAX_FAILED_LOGINS`` in a window, even a right password
    is refused until the window moves on.  Every attempt is in the audit log.
    """
    scope = f"login:{name.lower()[:200]}:{_client(request)}"
    limiter = state.gateway.limiter
    # peek: refused once the failures reach the cap (a zero-cost check adds nothing)
    peek = await limiter.check([Limit(scope, tpm=MAX_FAILED_LOGINS - 1)], 0)
    details = {"ip": _client(request)}
    if not peek.allowed:
        await run_in_threadpool(
            audit.record,
            state.store,
            actor=f"user:{name[:200]}",
            action="user.login_failed",
            target=name[:200],
            details={**details, "reason": "rate_limited"},
        )
        return None, "Too many failed sign-ins; wait a minute and try again.", 429
    user = await run_in_threadpool(access.authenticate, state.store, name, password)
    if user is None:
        await limiter.check([Limit(scope, tpm=_UNLIMITED)], 1)
        await run_in_threadpool(
            audit.record,
            state.store,
            actor=f"user:{name[:200]}",
            action="user.login_failed",
            target=name[:200],
            details={**details, "reason": "bad_credentials"},
        )
        return None, "That name and password were not accepted.", 401
    if not (user["memberships"] or (user["owner"] and await run_in_threadpool(state.store.list_projects))):
        return None, "Your account has no project yet: ask an admin to add you to one.", 403
    token = await run_in_threadpool(access.create_session, state.store, user["id"], SESSION_TTL)
    await run_in_threadpool(
        audit.record,
        state.store,
        actor=f"user:{user['name']}",
        action="user.login",
        target=user["id"],
        details=details,
    )
    return token, "", 303


def build(ui: UIContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.post("/account/project")
    async def switch_project(request: Request) -> Response:
        """The top bar's project switcher (users with several projects)."""
        token = request.cookies.get(SESSION_COOKIE, "")
        p = ui.principal(request)
        if p is None or p.user_name is None or not token:
            return ui.to_login(request)
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return Response("cross-site form post refused", status_code=403)
        raw = (await request.body())[:4096]
        form = parse_qs(raw.decode("utf-8", "replace"))
        pid = (form.get("project") or [""])[0]
        ok = await run_in_threadpool(access.switch_project, ui.state(request).store, token, pid)
        if not ok:
            return Response("you are not a member of that project", status_code=403)
        return RedirectResponse("/traces", status_code=303)

    return r
