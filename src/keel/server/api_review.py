"""Human review and online evaluation: annotation queues and their items (/api/annotation-queues,
/api/annotation-items) and online evaluation rules (/api/online-rules).

The master key sees and manages every project's queues and rules (``project`` picks one when
creating); a project's key sees and manages its own project's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import KeelError
from keel.evals import online, review
from keel.server.access import require_write
from keel.server.api import Caller
from keel.types import Principal

__all__ = ["build_router"]

T = TypeVar("T")
_TRACE_ID = r"^[0-9a-fA-F]{32}$"
_SCORE_NAME = r"^[A-Za-z0-9_.:\-]{1,100}$"
ItemId = Annotated[int, Path(ge=1, le=2**53, description="Queue item id.")]


def _err(status: int, message: str, code: str, etype: str = "invalid_request_error") -> HTTPException:
    return HTTPException(status, detail={"message": message, "type": etype, "code": code})


async def _run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except KeelError as err:
        raise _err(err.status, err.message, err.code, err.type) from None


def _store(request: Request) -> Any:
    return request.app.state.keel.store


def _may_write(request: Request, p: Caller) -> None:
    """Writes need the right to change annotations (queues, reviews) or evals (online rules)."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        require_write(p, "evals" if "/online-rules" in request.url.path else "annotations")


def _scope(p: Principal) -> str | None:
    """The project a caller may see: None (every project) for the master key."""
    return None if p.is_master else p.project_id


async def _write_project(request: Request, p: Principal, project: str | None) -> str | None:
    """The project a new queue or rule belongs to (the master key may name one, or none: all)."""
    if not p.is_master:
        if p.project_id is None:
            raise _err(403, "this key belongs to no project", "forbidden", "permission_error")
        return p.project_id
    if project is None:
        return None
    found = await run_in_threadpool(_store(request).get_project, project)
    if found is None:
        raise _err(404, f"project {project!r} not found", "not_found")
    return str(found["id"])


def _not_found(what: str) -> HTTPException:
    return _err(404, f"{what} not found", "not_found")


# -- wire models ------------------------------------------------------------------------------------


class QueueIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    score_name: str = Field(pattern=_SCORE_NAME, description="The score reviewers give, e.g. `quality`.")
    score_type: Literal["scale", "boolean"] = Field(
        default="scale", description="`scale`: 1 to 5; `boolean`: yes or no."
    )
    description: str | None = Field(default=None, max_length=5000)
    project: str | None = Field(default=None, description="Project name or id (master key only).")


class QueueOut(BaseModel):
    id: str
    project_id: str | None
    name: str
    description: str | None
    score_name: str
    score_type: str
    created_at: str | None
    pending: int
    done: int
    skipped: int


class TraceBrief(BaseModel):
    name: str | None
    model: str | None
    start_time: str | None
    status: str | None


class ItemOut(BaseModel):
    id: int
    queue_id: str
    trace_id: str
    status: str
    value: float | None
    comment: str | None
    reviewer: str | None
    score_id: str | None
    source: str
    created_at: str | None
    reviewed_at: str | None
    trace: TraceBrief | None = None


class ItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace_ids: list[str] = Field(min_length=1, max_length=review.MAX_BATCH)


class ItemsAdded(BaseModel):
    added: int
    already_queued: list[str]
    not_found: list[str]


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: bool | float | str | None = Field(
        default=None, description="1 to 5 for a scale queue; true/false (or yes/no) for a boolean queue."
    )
    comment: str | None = Field(default=None, max_length=10_000)
    skip: bool = Field(default=False, description="Skip this item (no score).")


class ToDatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1, max_length=200, description="Dataset name (created when missing).")
    item_ids: list[int] | None = Field(default=None, description="Reviewed items to send; default: all.")
    expected_from_output: bool = Field(default=True, description="Use the traced reply as `expected`.")


class RuleOut(BaseModel):
    id: str
    project_id: str | None
    name: str
    enabled: bool
    filter: dict[str, Any]
    sample_rate: float
    scorers: list[dict[str, Any]]
    queue_id: str | None
    watermark: int
    matched: int
    sampled: int
    scored: int
    errors: int
    created_at: str | None
    updated_at: str | None


class RuleIn(online.RuleSpec):
    project: str | None = Field(default=None, description="Project name or id (master key only).")


# -- routes -----------------------------------------------------------------------------------------


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api", tags=["review"], dependencies=[Depends(_may_write)])

    # annotation queues
    @r.get("/annotation-queues", response_model=list[QueueOut], summary="Annotation queues")
    async def list_queues(request: Request, p: Caller) -> Any:
        return await _run(review.list_queues, _store(request), _scope(p))

    @r.post("/annotation-queues", response_model=QueueOut, status_code=201, summary="Create a queue")
    async def create_queue(request: Request, body: QueueIn, p: Caller) -> Any:
        pid = await _write_project(request, p, body.project)
        return await _run(
            review.create_queue,
            _store(request),
            name=body.name,
            score_name=body.score_name,
            score_type=body.score_type,
            description=body.description,
            project_id=pid,
        )

    @r.get("/annotation-queues/{queue_id}", response_model=QueueOut, summary="One queue")
    async def get_queue(request: Request, queue_id: str, p: Caller) -> Any:
        q = await _run(review.get_queue, _store(request), queue_id, _scope(p))
        if q is None:
            raise _not_found(f"queue {queue_id!r}")
        return q

    @r.delete("/annotation-queues/{queue_id}", summary="Delete a queue and its items")
    async def delete_queue(request: Request, queue_id: str, p: Caller) -> dict[str, Any]:
        if not await _run(review.delete_queue, _store(request), queue_id, _scope(p)):
            raise _not_found(f"queue {queue_id!r}")
        return {"id": queue_id, "deleted": True}

    @r.get("/annotation-queues/{queue_id}/items", response_model=list[ItemOut], summary="A queue's items")
    async def list_items(
        request: Request,
        queue_id: str,
        p: Caller,
        status: Literal["pending", "done", "skipped"] | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        after: int | None = Query(
            default=None, ge=0, le=2**53, description="Items after this item id (pagination)."
        ),
    ) -> Any:
        if await _run(review.get_queue, _store(request), queue_id, _scope(p)) is None:
            raise _not_found(f"queue {queue_id!r}")
        return await _run(
            review.list_items, _store(request), queue_id, status=status, limit=limit, after=after
        )

    @r.post(
        "/annotation-queues/{queue_id}/items",
        response_model=ItemsAdded,
        status_code=201,
        summary="Put traces in a queue",
    )
    async def add_items(request: Request, queue_id: str, body: ItemsIn, p: Caller) -> Any:
        bad = [t for t in body.trace_ids if not re.match(_TRACE_ID, t)]
        if bad:
            raise _err(400, f"trace_ids: {bad[0]!r} is not a trace id (32 hex digits)", "invalid_request")
        return await _run(
            review.add_items,
            _store(request),
            queue_id,
            [t.lower() for t in body.trace_ids],
            project_id=_scope(p),
        )

    @r.post(
        "/annotation-queues/{queue_id}/dataset",
        summary="Send reviewed items to a dataset",
        description="Each reviewed item's trace becomes a dataset item (its review in the metadata).",
    )
    async def to_dataset(request: Request, queue_id: str, body: ToDatasetIn, p: Caller) -> dict[str, Any]:
        return await _run(
            review.send_to_dataset,
            _store(request),
            queue_id,
            body.dataset,
            item_ids=body.item_ids,
            expected_from_output=body.expected_from_output,
            project_id=_scope(p),
        )

    @r.get("/annotation-items/{item_id}", response_model=ItemOut, summary="One queue item")
    async def get_item(request: Request, item_id: ItemId, p: Caller) -> Any:
        item = await _run(review.get_item, _store(request), item_id, _scope(p))
        if item is None:
            raise _not_found(f"item {item_id}")
        return item

    @r.post("/annotation-items/{item_id}/review", response_model=ItemOut, summary="Review an item")
    async def review_item(request: Request, item_id: ItemId, body: ReviewIn, p: Caller) -> Any:
        if not body.skip and body.value is None:
            raise _err(400, "value: required unless skip is true", "invalid_request")
        return await _run(
            review.review_item,
            _store(request),
            item_id,
            value=body.value,
            comment=body.comment,
            reviewer=p.user_name or p.name or p.key_id or ("master" if p.is_master else None),
            skip=body.skip,
            project_id=_scope(p),
        )

    # online evaluation rules
    @r.get("/online-rules", response_model=list[RuleOut], summary="Online evaluation rules")
    async def list_rules(request: Request, p: Caller) -> Any:
        return await _run(online.list_rules, _store(request), _scope(p))

    async def _check_queue(request: Request, p: Principal, queue_id: str | None) -> None:
        if (
            queue_id is not None
            and await _run(review.get_queue, _store(request), queue_id, _scope(p)) is None
        ):
            raise _err(400, f"queue_id: queue {queue_id!r} not found", "invalid_request")

    @r.post("/online-rules", response_model=RuleOut, status_code=201, summary="Create an online rule")
    async def create_rule(request: Request, body: RuleIn, p: Caller) -> Any:
        pid = await _write_project(request, p, body.project)
        await _check_queue(request, p, body.queue_id)
        spec = online.RuleSpec.model_validate(body.model_dump(exclude={"project"}))
        return await _run(online.create_rule, _store(request), spec, pid)

    @r.get("/online-rules/{rule_id}", response_model=RuleOut, summary="One online rule")
    async def get_rule(request: Request, rule_id: str, p: Caller) -> Any:
        rule = await _run(online.get_rule, _store(request), rule_id, _scope(p))
        if rule is None:
            raise _not_found(f"rule {rule_id!r}")
        return rule

    @r.put("/online-rules/{rule_id}", response_model=RuleOut, summary="Replace an online rule")
    async def update_rule(request: Request, rule_id: str, body: online.RuleSpec, p: Caller) -> Any:
        await _check_queue(request, p, body.queue_id)
        return await _run(online.update_rule, _store(request), rule_id, body, _scope(p))

    @r.delete("/online-rules/{rule_id}", summary="Delete an online rule")
    async def delete_rule(request: Request, rule_id: str, p: Caller) -> dict[str, Any]:
        if not await _run(online.delete_rule, _store(request), rule_id, _scope(p)):
            raise _not_found(f"rule {rule_id!r}")
        return {"id": rule_id, "deleted": True}

    return r
