"""/api/audit: the append-only, hash-chained log of administrative actions, and its verification."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from keel.server.api import principal_from_request
from keel.store import audit
from keel.types import Principal

__all__ = ["build_router"]

Caller = Annotated[Principal, Depends(principal_from_request)]


class AuditRecordOut(BaseModel):
    seq: int
    at: str | None
    actor: str
    project_id: str | None
    action: str
    target: str | None
    details: dict[str, Any] | None
    hash: str


class AuditPage(BaseModel):
    data: list[AuditRecordOut]
    next_before_seq: int | None


class VerificationOut(BaseModel):
    ok: bool
    checked: int
    head_seq: int
    first_bad_seq: int | None
    problem: str | None


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api/audit", tags=["audit"])

    @r.get("", response_model=AuditPage, summary="Audit records, newest first")
    async def list_audit(
        request: Request,
        p: Caller,
        action: str | None = None,
        actor: str | None = None,
        before_seq: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        store = request.app.state.keel.store
        rows = await run_in_threadpool(
            audit.list_records,
            store,
            project_id=None if p.is_master else p.project_id,  # a project's keys see their project's records
            action=action,
            actor=actor,
            before_seq=before_seq,
            limit=limit,
        )
        return {"data": rows, "next_before_seq": rows[-1]["seq"] if len(rows) == limit else None}

    @r.get("/verify", response_model=VerificationOut, summary="Check the hash chain end to end")
    async def verify(request: Request, p: Caller) -> dict[str, Any]:
        from keel.server.api import _require_admin

        _require_admin(p)
        v = await run_in_threadpool(audit.verify, request.app.state.keel.store)
        return v.__dict__

    return r
