"""/api/accounts, /api/projects/{project}/members, PATCH /api/keys/{key_id}: users, roles, key scopes.

Accounts are the people who sign in to the UI (never to /api, which takes keys); they are not the
end users of traces (``/api/users``).  The master key manages every user; a
project admin (a key with the ``admin`` scope) sees and changes the members of its own project
and the scopes of its project's keys.  Every change is in the audit log.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import KeelError
from keel.server.access import deny, is_project_admin, require_master, require_project
from keel.server.api import Caller, KeyOut, _audit
from keel.store import access
from keel.types import Principal

__all__ = ["build_router"]

Role = Literal["admin", "developer", "viewer"]
Scope = Literal["gateway", "ingest", "read", "admin"]


class MembershipOut(BaseModel):
    project_id: str
    project: str
    role: str


class UserOut(BaseModel):
    id: str
    name: str
    email: str | None
    owner: bool = Field(description="An organisation owner: every project, every action (UI).")
    disabled: bool
    created_at: str | None
    memberships: list[MembershipOut]


class MembershipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(description="Project id or name.")
    role: Role


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=access.MIN_PASSWORD, max_length=1024)
    email: str | None = Field(default=None, max_length=320)
    owner: bool = False
    memberships: list[MembershipIn] = Field(default_factory=list)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disabled: bool | None = Field(default=None, description="Disabling ends the user's sessions at once.")
    owner: bool | None = None
    email: str | None = Field(default=None, max_length=320)
    password: str | None = Field(
        default=None, min_length=access.MIN_PASSWORD, max_length=1024, description="Ends the user's sessions."
    )


class MemberOut(BaseModel):
    user_id: str
    user: str
    role: str
    disabled: bool


class MemberSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role


class ScopesSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[Scope] = Field(description="gateway, ingest, read, admin")


def _http(err: KeelError) -> HTTPException:
    return HTTPException(err.status, detail={"message": err.message, "type": err.type, "code": err.code})


def _not_found(what: str) -> HTTPException:
    return HTTPException(
        404, detail={"message": f"{what} not found", "type": "invalid_request_error", "code": "not_found"}
    )


async def _call(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except KeelError as err:
        raise _http(err) from None


def _view(user: dict[str, Any], p: Principal) -> dict[str, Any]:
    """A user as ``p`` may see them: a project admin sees their membership of its project only."""
    if p.is_master:
        return user
    return {**user, "memberships": [m for m in user["memberships"] if m["project_id"] == p.project_id]}


def _project_admin(p: Principal) -> None:
    if not is_project_admin(p):
        deny("managing users needs the master key or a key with the 'admin' scope")


async def _project(request: Request, p: Principal, ref: str) -> str:
    """The id of a project ``p`` administers (404 for another project's)."""
    _project_admin(p)
    found = await run_in_threadpool(request.app.state.keel.store.get_project, ref)
    if found is None:
        raise _not_found(f"project {ref!r}")
    require_project(p, found["id"])
    return str(found["id"])


async def _user_seen(request: Request, p: Principal, user_id: str) -> dict[str, Any]:
    """A user ``p`` may see: any for the master key, members of its project for a project admin."""
    _project_admin(p)
    user = await run_in_threadpool(access.get_user, request.app.state.keel.store, user_id)
    if user is None or not (p.is_master or any(m["project_id"] == p.project_id for m in user["memberships"])):
        raise _not_found(f"user {user_id!r}")
    return user


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get(
        "/accounts", response_model=list[UserOut], tags=["accounts"], summary="List users (and their roles)"
    )
    async def list_users(request: Request, p: Caller) -> list[dict[str, Any]]:
        _project_admin(p)
        store = request.app.state.keel.store
        users = await run_in_threadpool(access.list_users, store, None if p.is_master else p.project_id)
        return [_view(u, p) for u in users]

    @r.post("/accounts", response_model=UserOut, status_code=201, tags=["accounts"], summary="Create a user")
    async def create_user(request: Request, body: UserCreate, p: Caller) -> dict[str, Any]:
        require_master(p, "creating users")
        store = request.app.state.keel.store
        projects = []
        for m in body.memberships:
            found = await run_in_threadpool(store.get_project, m.project)
            if found is None:
                raise _not_found(f"project {m.project!r}")
            projects.append((found["id"], m.role))
        user = await _call(
            access.create_user, store, body.name, body.password, email=body.email, owner=body.owner
        )
        for pid, role in projects:
            user, _ = await _call(access.add_membership, store, user["id"], pid, role)
        await _audit(
            request,
            p,
            "user.create",
            user["id"],
            None,
            {"name": user["name"], "owner": body.owner, "memberships": user["memberships"]},
        )
        return user

    @r.get("/accounts/{account_id}", response_model=UserOut, tags=["accounts"], summary="One user")
    async def get_user(request: Request, account_id: str, p: Caller) -> dict[str, Any]:
        return _view(await _user_seen(request, p, account_id), p)

    @r.patch(
        "/accounts/{account_id}",
        response_model=UserOut,
        tags=["accounts"],
        summary="Disable, re-enable, change",
    )
    async def patch_user(request: Request, account_id: str, body: UserPatch, p: Caller) -> dict[str, Any]:
        require_master(p, "changing users")
        store = request.app.state.keel.store
        user = await run_in_threadpool(access.get_user, store, account_id)
        if user is None:
            raise _not_found(f"user {account_id!r}")
        changes: dict[str, Any] = {}
        if body.password is not None:
            user = await _call(access.set_password, store, user["id"], body.password)
            changes["password"] = "changed"
        if body.email is not None:
            user = await _call(access.set_email, store, user["id"], body.email)
            changes["email"] = body.email
        if body.owner is not None:
            user = await _call(access.set_owner, store, user["id"], body.owner)
            changes["owner"] = body.owner
        if body.disabled is not None:
            user = await _call(access.set_disabled, store, user["id"], body.disabled)
            changes["disabled"] = body.disabled
        await _audit(request, p, "user.update", user["id"], None, {"name": user["name"], **changes})
        return user

    @r.delete("/accounts/{account_id}", status_code=204, tags=["accounts"], summary="Delete a user")
    async def delete_user(request: Request, account_id: str, p: Caller) -> Response:
        require_master(p, "deleting users")
        user = await _call(access.delete_user, request.app.state.keel.store, account_id)
        await _audit(request, p, "user.delete", user["id"], None, {"name": user["name"]})
        return Response(status_code=204)

    @r.get(
        "/projects/{project}/members",
        response_model=list[MemberOut],
        tags=["accounts"],
        summary="Members of a project and their roles",
    )
    async def members(request: Request, project: str, p: Caller) -> list[dict[str, Any]]:
        pid = await _project(request, p, project)
        rows: list[dict[str, Any]] = await run_in_threadpool(
            access.list_members, request.app.state.keel.store, pid
        )
        return rows

    @r.put(
        "/projects/{project}/members/{account_id}",
        response_model=UserOut,
        tags=["accounts"],
        summary="Give a user a role in a project",
    )
    async def set_member(
        request: Request, project: str, account_id: str, body: MemberSet, p: Caller
    ) -> dict[str, Any]:
        pid = await _project(request, p, project)
        user, previous = await _call(
            access.add_membership, request.app.state.keel.store, account_id, pid, body.role
        )
        await _audit(
            request,
            p,
            "membership.set",
            user["id"],
            pid,
            {"user": user["name"], "role": body.role, "previous": previous},
        )
        return _view(user, p)

    @r.delete(
        "/projects/{project}/members/{account_id}",
        status_code=204,
        tags=["accounts"],
        summary="Take a user out of a project",
    )
    async def remove_member(request: Request, project: str, account_id: str, p: Caller) -> Response:
        pid = await _project(request, p, project)
        role = await _call(access.remove_membership, request.app.state.keel.store, account_id, pid)
        if role is None:
            raise _not_found(f"member {account_id!r}")
        await _audit(request, p, "membership.remove", account_id, pid, {"previous": role})
        return Response(status_code=204)

    @r.patch("/keys/{key_id}", response_model=KeyOut, tags=["keys"], summary="Change a key's scopes")
    async def set_scopes(request: Request, key_id: str, body: ScopesSet, p: Caller) -> dict[str, Any]:
        _project_admin(p)
        keel = request.app.state.keel
        row = await run_in_threadpool(keel.store.get_key, key_id)
        if row is None or not (p.is_master or row.project_id == p.project_id):
            raise _not_found(f"key {key_id!r}")
        if row.kind == "public":
            raise HTTPException(
                400,
                detail={
                    "message": "a public key has no scopes: it may only post end-user feedback",
                    "type": "invalid_request_error",
                    "code": "invalid_request",
                },
            )
        before = row.public()["scopes"]
        row = await run_in_threadpool(keel.store.set_key_scopes, key_id, body.scopes)
        await keel.keys.changed()
        await _audit(
            request,
            p,
            "key.scopes",
            key_id,
            row.project_id,
            {"previous": before, "scopes": sorted(set(body.scopes))},
        )
        return dict(row.public())

    return r
