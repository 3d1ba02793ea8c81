"""keel's web UI: server-rendered pages over the trace store (Jinja2 templates, one CSS, one small JS).

Authentication is a pasted API key (the master key or a virtual key) kept in an HttpOnly,
SameSite=Strict cookie and re-checked against the in-memory key cache on every request, so a
revoked key is logged out at its next click.  A virtual key sees its own project only.
"""

from __future__ import annotations

import hashlib
import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from keel.server.access import check_method
from keel.store import TraceFilter, utcnow
from keel.store.access import revoke_session
from keel.store.scores import trace_scores
from keel.store.search import parse_query
from keel.types import Principal
from keel.ui import views
from keel.ui.account import SESSION_COOKIE, SESSION_TTL, password_login, projects_of, session_principal
from keel.ui.context import UIContext

__all__ = ["COOKIE", "PAGE_MODULES", "UIContext", "mount_ui"]

# Page modules beyond the trace explorer: each exposes build(ui: UIContext) -> APIRouter.
PAGE_MODULES: tuple[str, ...] = (
    "keel.ui.cost",
    "keel.ui.dashboards",
    "keel.ui.prompts",
    "keel.ui.sessions",
    "keel.ui.account",
    "keel.ui.review",
    "keel.ui.evals",
)

COOKIE = "keel_key"
# further trace explorer filters (text, then numbers); full-text search is "q"
EXPLORER_TEXT_KEYS = ("q", "session", "name", "key", "team", "provider", "prompt")
EXPLORER_NUMBER_KEYS = ("prompt_version", "min_latency_ms", "max_latency_ms", "min_cost_usd", "max_cost_usd")
EXPLORER_KEYS = EXPLORER_TEXT_KEYS + EXPLORER_NUMBER_KEYS
HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_FORM_BYTES = 16 * 1024
COOKIE_MAX_AGE = 7 * 24 * 3600
RANGES: dict[str, tuple[str, timedelta]] = {
    "1h": ("Last hour", timedelta(hours=1)),
    "24h": ("Last 24 h", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
}
FILTER_KEYS = ("model", "status", "user", "tag", "project", "range", "start", "end", "limit", *EXPLORER_KEYS)

_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _asset_versions() -> dict[str, str]:
    """Content hashes of the static files, appended to their URLs so a new release busts caches."""
    out = {}
    for f in STATIC_DIR.iterdir():
        if f.is_file():
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    return out


def _make_env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    versions = _asset_versions()

    def static(name: str) -> str:
        v = versions.get(name)
        return f"/static/{name}?v={v}" if v else f"/static/{name}"

    env.globals["static"] = static
    env.filters.update(
        cost=views.fmt_cost,
        ms=views.fmt_ms,
        tokens=views.fmt_tokens,
        reltime=views.rel_time,
        abstime=views.abs_time,
        snippet=views.snippet,
        pretty=views.pretty_json,
    )
    return env


# -- helpers ------------------------------------------------------------------------------------


def _state(request: Request) -> Any:
    return request.app.state.keel


def _principal(request: Request) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    if token:  # a signed-in user: their role in the project they are looking at
        user = session_principal(_state(request), token)
        if user is not None:
            return user
    key = request.cookies.get(COOKIE)
    if not key:
        return None
    p: Principal | None = _state(request).keys.lookup(key)
    return p


def _ui_writer(request: Request) -> None:
    """A form post by a signed-in principal that may change nothing (a viewer, a read-only key): 403."""
    if request.method in ("GET", "HEAD") or request.url.path.startswith("/account/"):
        return
    p = _principal(request)
    if p is not None:
        check_method(p, request.method)


def _safe_next(value: str | None) -> str:
    """Only same-site paths: no scheme, no host, no protocol-relative '//' or backslash tricks."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or "\n" in value:
        return "/traces"
    if value.startswith("/login") or value.startswith("/logout"):
        return "/traces"
    return value


def _to_login(request: Request) -> Response:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = "/login" if here in ("/", "/traces") else "/login?" + urlencode({"next": here})
    resp = RedirectResponse(target, status_code=303)
    if request.cookies.get(COOKIE):  # a stale (revoked) key: drop it
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    if request.cookies.get(SESSION_COOKIE):  # an ended session (expired, revoked, user disabled)
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return resp


def _who(request: Request, p: Principal) -> dict[str, Any]:
    if p.is_master:
        return {"label": "Master key", "detail": "all projects", "is_master": True}
    project = _state(request).store.get_project(p.project_id) if p.project_id else None
    if p.user_name is not None:
        role = "owner" if p.is_owner else (p.role or "no role")
        return {
            "label": p.user_name,
            "detail": f"{role} · project {project['name']}" if project else role,
            "is_master": False,
            "role": role,
            "project_id": p.project_id,
            "projects": projects_of(_state(request), request.cookies.get(SESSION_COOKIE, "")),
        }
    return {
        "label": p.name or "virtual key",
        "detail": f"project {project['name']}" if project else "virtual key",
        "is_master": False,
    }


def _same_origin(request: Request) -> bool:
    """Refuse cross-site form posts (login CSRF): a browser's Origin must name this host."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _parse_when(value: str | None) -> datetime | None:
    """A datetime-local value (or any ISO 8601 time) as naive UTC; naive inputs are taken as UTC."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def _explorer_numbers(params: dict[str, str], notices: list[str]) -> dict[str, float]:
    """The numeric filters that parse (non-negative); the others are dropped with a notice."""
    out: dict[str, float] = {}
    for name in EXPLORER_NUMBER_KEYS:
        if name not in params:
            continue
        try:
            value = float(params[name])
            if value < 0 or value != value or value in (float("inf"), float("-inf")):
                raise ValueError(name)
            if name == "prompt_version" and not value.is_integer():
                raise ValueError(name)
        except ValueError:
            notices.append(
                f"{name.replace('_', ' ').capitalize()} {params[name]!r} is not a valid number; ignored."
            )
            params.pop(name)
            continue
        out[name] = value
    return out


def _traces_url(params: dict[str, str], **changes: str | None) -> str:
    merged = {**params, **changes}
    clean = {k: v for k, v in merged.items() if v not in (None, "")}
    return "/traces" + ("?" + urlencode(clean) if clean else "")


# -- the routes ---------------------------------------------------------------------------------


def mount_ui(api: FastAPI) -> None:
    """Add the UI's pages and static files to ``api`` (none of them in the OpenAPI schema)."""
    env = _make_env()
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    router = APIRouter(include_in_schema=False)

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(template).render(request_path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def login_page(
        request: Request, *, error: str | None = None, next_url: str = "", status: int = 200, tab: str = "key"
    ) -> HTMLResponse:
        return render(request, "login.html", status=status, error=error, next_url=next_url, who=None, tab=tab)

    @router.get("/")
    def home(request: Request) -> Response:
        return RedirectResponse("/traces" if _principal(request) else "/login", status_code=303)

    @router.get("/login")
    def login_form(request: Request) -> Response:
        nxt = request.query_params.get("next", "")
        if _principal(request) is not None:
            return RedirectResponse(_safe_next(nxt), status_code=303)
        tab = "user" if request.query_params.get("tab") == "user" else "key"
        return login_page(request, next_url=nxt, tab=tab)

    @router.post("/login")
    async def login_submit(request: Request) -> Response:
        if not _same_origin(request):
            return login_page(request, error="Sign in from keel's own login page.", status=403)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                return login_page(request, error="That form was too large.", status=413)
        form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        key = (form.get("key") or [""])[0].strip()
        nxt = (form.get("next") or [""])[0]
        username = (form.get("username") or [""])[0].strip()
        if username:  # the user + password form
            token, error, status = await password_login(
                _state(request), request, username, (form.get("password") or [""])[0]
            )
            if token is None:
                return login_page(request, error=error, next_url=nxt, status=status, tab="user")
            resp = RedirectResponse(_safe_next(nxt), status_code=303)
            if request.cookies.get(COOKIE):  # a user sign-in replaces a key's
                resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
            resp.set_cookie(
                SESSION_COOKIE,
                token,
                max_age=int(SESSION_TTL.total_seconds()),
                path="/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return resp
        if not key:
            return login_page(request, error="Paste an API key to sign in.", next_url=nxt, status=401)
        found = _state(request).keys.lookup_any(key)
        if found is not None and found.is_public:
            return login_page(
                request,
                error="A public key (pk-keel-) can only send end-user feedback; sign in with a secret key.",
                next_url=nxt,
                status=403,
            )
        if found is None:
            return login_page(
                request,
                error="That key was not accepted: it is unknown or has been revoked.",
                next_url=nxt,
                status=401,
            )
        resp = RedirectResponse(_safe_next(nxt), status_code=303)
        if request.cookies.get(SESSION_COOKIE):  # a key sign-in replaces a user's session
            resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        resp.set_cookie(
            COOKIE,
            key,
            max_age=COOKIE_MAX_AGE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return resp

    @router.api_route("/logout", methods=["GET", "POST"])
    def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            revoke_session(_state(request).store, token)
            resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    @router.get("/traces")
    def traces(request: Request) -> Response:
        p = _principal(request)
        if p is None:
            return _to_login(request)
        keel = _state(request)
        store = keel.store
        q = request.query_params
        notices: list[str] = []
        params = {k: v for k in FILTER_KEYS if (v := q.get(k, "").replace("\x00", "").strip())}

        status = params.get("status")
        if status not in (None, "ok", "error"):
            notices.append(f"Unknown status {status!r} ignored.")
            params.pop("status")
            status = None
        limit = DEFAULT_LIMIT
        if "limit" in params:
            try:
                limit = max(1, min(MAX_LIMIT, int(params["limit"])))
            except ValueError:
                params.pop("limit")
        start = end = None
        rng = params.get("range")
        if rng is not None and rng not in RANGES:
            notices.append(f"Unknown time range {rng!r} ignored.")
            params.pop("range")
            rng = None
        if rng and ("start" in params or "end" in params):
            params.pop("range")  # explicit From/To times win over a quick range
            rng = None
        if rng:
            start = utcnow() - RANGES[rng][1]
        for name in ("start", "end"):
            if name in params:
                when = _parse_when(params[name])
                if when is None:
                    notices.append(
                        f"The {'From' if name == 'start' else 'To'} time {params[name]!r} is not a valid time; ignored."
                    )
                    params.pop(name)
                elif name == "start":
                    start = when
                else:
                    end = when

        numbers = _explorer_numbers(params, notices)
        if "q" in params:
            try:
                parse_query(params["q"])
            except ValueError:
                notices.append(f"The search {params['q']!r} has no words to look for; ignored.")
                params.pop("q")

        projects: list[dict[str, Any]] = store.list_projects() if p.is_master else []
        project_names = {x["id"]: x["name"] for x in projects}
        if p.is_master:
            project_id = params.get("project") or None
        else:
            params.pop("project", None)
            project_id = p.project_id

        f = TraceFilter(
            project_id=project_id,
            model=params.get("model"),
            status=status,
            user=params.get("user"),
            tag=params.get("tag"),
            start=start,
            end=end,
            q=params.get("q"),
            session=params.get("session"),
            name=params.get("name"),
            key_id=params.get("key"),
            team_id=params.get("team"),
            provider=params.get("provider"),
            prompt_name=params.get("prompt"),
            prompt_version=int(numbers["prompt_version"]) if "prompt_version" in numbers else None,
            min_latency_ms=numbers.get("min_latency_ms"),
            max_latency_ms=numbers.get("max_latency_ms"),
            min_cost_usd=numbers.get("min_cost_usd"),
            max_cost_usd=numbers.get("max_cost_usd"),
        )
        cursor = q.get("cursor") or None
        try:
            rows, next_cursor = store.list_traces(f, limit=limit, cursor=cursor)
        except ValueError:
            notices.append("That page link is no longer valid; showing the newest traces.")
            cursor = None
            rows, next_cursor = store.list_traces(f, limit=limit)

        models = store.distinct_models(project_id)
        if f.model and f.model not in models:
            models = sorted([*models, f.model])
        filtered = any(k in params for k in FILTER_KEYS if k != "limit")
        base = str(request.base_url).rstrip("/")
        names = [n for n in keel.models.names() if p.may_use(n)]
        return render(
            request,
            "traces.html",
            who=_who(request, p),
            rows=rows,
            params=params,
            models=models,
            projects=projects,
            project_names=project_names,
            ranges=[(k, label) for k, (label, _) in RANGES.items()],
            active_range=rng,
            limit=limit,
            cursor=cursor,
            newest_url=_traces_url(params) if cursor else None,
            older_url=_traces_url(params, cursor=next_cursor) if next_cursor else None,
            filtered=filtered,
            more_filters=any(k in params for k in EXPLORER_KEYS if k != "q"),
            clear_url=_traces_url({"limit": params["limit"]} if "limit" in params else {}),
            range_url=lambda key: _traces_url(params, range=key, start=None, end=None),
            notices=notices,
            base_url=base,
            example_model=names[0] if names else "gpt-4o-mini",
            now=datetime.now(UTC),
        )

    @router.get("/traces/{trace_id}")
    def trace(request: Request, trace_id: str) -> Response:
        p = _principal(request)
        if p is None:
            return _to_login(request)
        who = _who(request, p)
        t = None
        if 0 < len(trace_id) <= 64:
            t = _state(request).store.get_trace(
                trace_id.lower(), project_id=None if p.is_master else p.project_id
            )
        if t is None:
            return render(request, "not_found.html", status=404, who=who, trace_id=trace_id)
        nodes = views.build_span_tree(t["spans"])
        selected = request.query_params.get("span")
        if selected not in {n.span["span_id"] for n in nodes}:
            selected = nodes[0].span["span_id"] if nodes else None
        details = [_span_view(n.span) for n in nodes]
        ttft = next((s["ttft_ms"] for s in t["spans"] if s.get("ttft_ms") is not None), None)
        return render(
            request,
            "trace.html",
            who=who,
            t=t,
            nodes=nodes,
            details=details,
            selected=selected,
            ttft=ttft,
            scores=trace_scores(_state(request).store, t["trace_id"]),
            total_ms=max((n.span.get("latency_ms") or 0.0 for n in nodes), default=0.0),
            now=datetime.now(UTC),
        )

    api.include_router(router)
    ui = UIContext(render=render, principal=_principal, to_login=_to_login, who=_who, state=_state)
    for name in PAGE_MODULES:  # every page's form posts pass the same baseline as /api writes
        api.include_router(importlib.import_module(name).build(ui), dependencies=[Depends(_ui_writer)])


def _span_view(s: dict[str, Any]) -> dict[str, Any]:
    """What the detail panel shows for one span."""
    has_usage = s.get("input_tokens") is not None or s.get("output_tokens") is not None
    messages_in = views.input_messages(s.get("input"))
    chat = messages_in is not None  # the parameters and tools of a chat request get their own sections
    return {
        "span": s,
        "cost": views.fmt_cost(s.get("cost_usd"), has_usage=has_usage) if s.get("kind") == "llm" else None,
        "messages_in": messages_in,
        "messages_out": views.output_messages(s.get("output")),
        "params": views.request_params(s.get("input")) if chat else [],
        "tools": views.tool_defs(s.get("input")) if chat else None,
        "attributes": views.attribute_rows(s.get("attributes")),
        "raw_in": None if s.get("input") is None else views.pretty_json(s.get("input")),
        "raw_out": None if s.get("output") is None else views.pretty_json(s.get("output")),
    }
