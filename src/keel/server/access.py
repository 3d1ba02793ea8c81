"""Who may do what: one place for the scope and role checks of every /api route and UI page.

Keys carry scopes (``gateway``, ``ingest``, ``read``, ``admin``); signed-in users carry a role in
the project they are looking at (``admin``, ``developer``, ``viewer``), and an owner may do
everything everywhere.  The master key may do everything.  Every check is a set-membership test
on the principal (no database), and refusals are 403s in the /api error shape.
"""

from __future__ import annotations

from typing import NoReturn

from fastapi import HTTPException

from keel.types import Principal

__all__ = [
    "ADMIN_AREAS",
    "DEVELOPER_AREAS",
    "can_write",
    "check_method",
    "deny",
    "has_scope",
    "is_project_admin",
    "project_scope",
    "require",
    "require_master",
    "require_project",
    "require_write",
]

# what a developer (user) may change; an ``ingest`` key may also post scores
DEVELOPER_AREAS = frozenset({"prompts", "datasets", "evals", "scores", "annotations", "reviews"})
# what only a project admin (user role, or a key with the ``admin`` scope) may change in its project
ADMIN_AREAS = frozenset({"keys", "users", "limits", "teams", "retention", "guardrails", "projects"})
_INGEST_AREAS = frozenset({"scores"})


def deny(message: str, code: str = "forbidden") -> NoReturn:
    raise HTTPException(403, detail={"message": message, "type": "permission_error", "code": code})


def has_scope(p: Principal, scope: str) -> bool:
    """Whether a principal holds a key scope (users hold ``read``; writes go through their role)."""
    if p.is_master or p.is_owner:
        return True
    if p.user_name is not None:
        return scope == "read" and p.role is not None
    return scope in p.scopes


def require(p: Principal, scope: str) -> None:
    """403 unless ``p`` holds ``scope`` (gateway, ingest, read, admin)."""
    if not has_scope(p, scope):
        who = f"user {p.user_name!r}" if p.user_name else "this key"
        deny(f"{who} lacks the '{scope}' scope", "scope_required")


def is_project_admin(p: Principal) -> bool:
    """Master, an owner, a user with the admin role, or a key with the admin scope."""
    if p.is_master or p.is_owner:
        return True
    if p.user_name is not None:
        return p.role == "admin"
    return "admin" in p.scopes


def can_write(p: Principal, area: str) -> bool:
    """Whether ``p`` may change things of ``area`` (prompts, datasets, keys, ...) in its project."""
    if is_project_admin(p):
        return True
    if p.user_name is not None:
        return p.role == "developer" and area in DEVELOPER_AREAS
    return area in _INGEST_AREAS and "ingest" in p.scopes


def require_write(p: Principal, area: str, project_id: str | None = None) -> None:
    """403 unless ``p`` may change ``area``; with ``project_id``, only in its own project."""
    if not can_write(p, area):
        if p.user_name is not None:
            deny(f"the {p.role or 'no'} role may not change {area} in this project")
        deny(f"changing {area} needs the master key or a key with the 'admin' scope")
    if project_id is not None:
        require_project(p, project_id)


def require_master(p: Principal, what: str = "this action") -> None:
    """403 unless the master key (or an owner) asks: actions across every project."""
    if not (p.is_master or p.is_owner):
        deny(f"{what} needs the master key")


def require_project(p: Principal, project_id: str | None) -> None:
    """404 when a project's thing is asked for by a principal of another project (nothing leaks)."""
    if p.is_master:
        return
    if project_id != p.project_id:
        raise HTTPException(
            404, detail={"message": "not found", "type": "invalid_request_error", "code": "not_found"}
        )


def project_scope(p: Principal) -> str | None:
    """The project a principal may see: None (every project) for the master key."""
    return None if p.is_master else p.project_id


def check_method(p: Principal, method: str) -> None:
    """The /api baseline: reads need ``read``; writes need a principal that may write something."""
    if method in ("GET", "HEAD", "OPTIONS"):
        require(p, "read")
        return
    if is_project_admin(p):
        return
    if p.user_name is not None:
        if p.role != "developer":
            deny(f"the {p.role or 'no'} role is read-only")
        return
    if "ingest" not in p.scopes:
        deny("this key may not change anything (it needs the 'admin' scope)", "scope_required")
