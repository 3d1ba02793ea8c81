"""Per-project trace retention: PATCH /api/projects/{project} and GET /api/retention.

The background sweep (keel.server.app) deletes, every ``retention_interval_s``, the traces of each
project older than its ``retention_days`` (or the global setting when the project has none).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from keel.server.access import require_project, require_write
from keel.server.api import Caller, _project_id
from keel.store.scores import project_retention, set_project_retention

__all__ = ["build_router"]


class ProjectPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retention_days: float | None = Field(
        ge=0,
        le=100_000,
        description="Days of traces kept for this project; 0 keeps them forever; null follows the global "
        "`retention_days` setting.",
    )


class ProjectRetention(BaseModel):
    id: str
    name: str
    retention_days: float | None = Field(description="The project's own setting (null: the global one).")
    effective_retention_days: float = Field(description="What the sweep applies (0: kept forever).")


class RetentionOut(BaseModel):
    default_retention_days: float = Field(description="The global `retention_days` setting (0: forever).")
    interval_s: float = Field(description="How often the background sweep runs.")
    projects: list[ProjectRetention]


def _view(row: dict[str, Any], default: float) -> dict[str, Any]:
    own = row["retention_days"]
    return {**row, "effective_retention_days": default if own is None else own}


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.patch(
        "/projects/{project}",
        response_model=ProjectRetention,
        tags=["projects"],
        summary="Set a project's trace retention",
    )
    async def patch_project(request: Request, project: str, body: ProjectPatch, p: Caller) -> dict[str, Any]:
        require_write(p, "retention")
        keel = request.app.state.keel
        pid = await run_in_threadpool(_project_id, keel.store, project)
        require_project(p, pid)  # a project admin sets its own project's retention only
        await run_in_threadpool(set_project_retention, keel.store, pid, body.retention_days)
        rows = await run_in_threadpool(project_retention, keel.store)
        row = next(x for x in rows if x["id"] == pid)
        return _view(row, keel.settings.retention_days)

    @r.get(
        "/retention", response_model=RetentionOut, tags=["projects"], summary="Trace retention per project"
    )
    def retention(request: Request, p: Caller) -> dict[str, Any]:
        keel = request.app.state.keel
        default = keel.settings.retention_days
        rows = [
            _view(x, default) for x in project_retention(keel.store) if p.is_master or x["id"] == p.project_id
        ]
        return {
            "default_retention_days": default,
            "interval_s": keel.settings.retention_interval_s,
            "projects": rows,
        }

    return r
