"""Datasets (/api/datasets) and eval runs (/api/evals): CRUD, import/export, items from traces, compare.

Scoping: a project key sees and writes its own project's datasets and runs; the master key sees
all of them, writes to ``?project=`` (default: the ``default`` project), and reads a dataset by
id, or by name when the name is unique across projects.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import KeelError
from keel.evals.compare import compare_runs
from keel.evals.datasets import (
    DatasetFormatError,
    dump_items,
    item_from_trace,
    normalise_items,
    parse_items,
)
from keel.server.access import require_write
from keel.server.api import Caller
from keel.store.evals import EvalStore
from keel.types import Principal

__all__ = ["build_router", "compare_refs"]

T = TypeVar("T")
MAX_IMPORT_BYTES = 64 * 1024 * 1024
MAX_ITEMS_PER_CALL = 100_000
_NAME = r"^[A-Za-z0-9_.\-]{1,200}$"
_TRACE = r"^[0-9a-fA-F]{32}$"
_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "yaml": "application/yaml"}
FINISH_WAIT_S = 15.0  # longest a finish waits for the trace writer to store the run's traces


def _err(status: int, message: str, code: str, etype: str = "invalid_request_error") -> HTTPException:
    return HTTPException(status, detail={"message": message, "type": etype, "code": code})


async def _run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except KeelError as err:
        raise _err(err.status, err.message, err.code, err.type) from None
    except DatasetFormatError as err:
        raise _err(400, str(err), "invalid_dataset") from None


def _evals(request: Request) -> EvalStore:
    return EvalStore(request.app.state.keel.store.engine)


def _read_scope(request: Request, p: Principal, project: str | None) -> str | None:
    if not p.is_master:
        return p.project_id
    if project is None:
        return None
    found = request.app.state.keel.store.get_project(project)
    if found is None:
        raise _err(404, f"project {project!r} not found", "not_found")
    return str(found["id"])


async def _write_scope(request: Request, p: Principal, project: str | None, area: str = "datasets") -> str:
    """The project a write goes to; 403 unless ``p`` may change ``area`` (datasets, evals)."""
    require_write(p, area)
    if not p.is_master:
        if p.project_id is None:
            raise _err(403, "this key belongs to no project", "forbidden", "permission_error")
        return p.project_id
    store = request.app.state.keel.store
    if project is not None:
        found = await run_in_threadpool(store.get_project, project)
        if found is None:
            raise _err(404, f"project {project!r} not found", "not_found")
        return str(found["id"])
    return str(await run_in_threadpool(store.ensure_project, "default"))


async def _dataset(request: Request, p: Principal, ref: str, project: str | None = None) -> dict[str, Any]:
    found = await _run(_evals(request).find_dataset, _read_scope(request, p, project), ref)
    if found is None:
        raise _err(404, f"dataset {ref!r} not found", "dataset_not_found")
    return found


async def _eval_run(request: Request, p: Principal, ref: str) -> dict[str, Any]:
    found = await _run(_evals(request).get_run, _read_scope(request, p, None), ref)
    if found is None:
        raise _err(
            404, f"eval run {ref!r} not found (an id, or the label of a completed run)", "run_not_found"
        )
    return found


# -- wire models ------------------------------------------------------------------------------------


class DatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME, description="Unique within the project.")
    description: str | None = Field(default=None, max_length=10_000)
    items: list[dict[str, Any]] | None = Field(default=None, description="Initial items (version 1).")


class DatasetOut(BaseModel):
    id: str
    project_id: str
    name: str
    description: str | None
    version: int
    item_count: int | None = None
    created_at: str | None
    updated_at: str | None


class ItemsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(
        max_length=MAX_ITEMS_PER_CALL,
        description="Items {id?, input, expected?, contexts?, metadata?}; an item whose id exists replaces it.",
    )
    replace: bool = Field(default=False, description="Remove the items not in this list (a full push).")


class ItemsChanged(DatasetOut):
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0


class ItemOut(BaseModel):
    id: str
    input: Any
    expected: Any
    contexts: list[str]
    metadata: dict[str, Any]
    source_trace_id: str | None
    version_added: int


class ItemPage(BaseModel):
    dataset: str
    version: int
    data: list[ItemOut]


class FromTraces(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trace_ids: list[Annotated[str, Field(pattern=_TRACE)]] = Field(min_length=1, max_length=1000)
    expected_from_output: bool = Field(
        default=True, description="Use each trace's reply as the expected output."
    )
    create: bool = Field(default=True, description="Create the dataset (by name) when it does not exist.")


class GateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baseline: str = Field(min_length=1, max_length=200, description="Baseline run id or label.")


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: str = Field(min_length=1, max_length=200)
    label: str | None = Field(
        default=None, pattern=_NAME, description="Name the run (a baseline to gate against)."
    )
    dataset: str | None = Field(default=None, description="Dataset id or name.")
    dataset_version: int | None = Field(default=None, ge=0)
    config: dict[str, Any] = Field(default_factory=dict)
    item_count: int = Field(default=0, ge=0)


class ScoreEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    value: float | None = Field(default=None, allow_inf_nan=False)
    passed: bool | None = None
    error: str | None = Field(default=None, max_length=200)


class ResultIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    variant: str = Field(min_length=1, max_length=200)
    item_id: str = Field(min_length=1, max_length=64)
    repeat: int = Field(default=0, ge=0, le=1000)
    output: str | None = Field(default=None, max_length=1_000_000)
    error: str | None = Field(default=None, max_length=10_000)
    trace_id: str | None = Field(default=None, pattern=_TRACE)
    latency_ms: float | None = Field(default=None, ge=0)
    cached: bool = False
    scores: dict[str, ScoreEntry] = Field(default_factory=dict)


class ResultsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[ResultIn] = Field(max_length=50_000)


class FinishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["completed", "failed"] = "completed"
    summary: dict[str, Any] = Field(default_factory=dict)
    scoring_cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class RunOut(BaseModel):
    id: str
    project_id: str
    suite: str
    label: str | None
    dataset_id: str | None
    dataset: str | None
    dataset_version: int | None
    status: str
    config: dict[str, Any]
    summary: dict[str, Any]
    item_count: int
    result_count: int
    cost_usd: float
    created_at: str | None
    finished_at: str | None


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    # -- datasets -------------------------------------------------------------------------------

    @r.get("/datasets", response_model=list[DatasetOut], tags=["datasets"], summary="List datasets")
    async def list_datasets(request: Request, p: Caller, project: str | None = None) -> list[dict[str, Any]]:
        return await _run(_evals(request).list_datasets, _read_scope(request, p, project))

    @r.post(
        "/datasets",
        response_model=ItemsChanged,
        status_code=201,
        tags=["datasets"],
        summary="Create a dataset",
    )
    async def create_dataset(
        request: Request, body: DatasetIn, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        pid = await _write_scope(request, p, project)
        items = await _run(normalise_items, body.items or [])
        store = _evals(request)
        ds = await _run(store.create_dataset, pid, body.name, body.description)
        if items:
            return await _run(store.add_items, ds["id"], items)
        return ds

    @r.get("/datasets/{ref}", response_model=DatasetOut, tags=["datasets"], summary="A dataset by id or name")
    async def get_dataset(
        request: Request, ref: str, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        return await _dataset(request, p, ref, project)

    @r.delete("/datasets/{ref}", response_model=DatasetOut, tags=["datasets"], summary="Delete a dataset")
    async def delete_dataset(
        request: Request, ref: str, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        require_write(p, "datasets")
        ds = await _dataset(request, p, ref, project)
        await _run(_evals(request).delete_dataset, ds["id"])
        return ds

    @r.get(
        "/datasets/{ref}/items",
        response_model=ItemPage,
        tags=["datasets"],
        summary="Items of a dataset version",
    )
    async def list_items(
        request: Request,
        ref: str,
        p: Caller,
        version: Annotated[int | None, Query(ge=0, description="Default: the latest version.")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0)] = 0,
        project: str | None = None,
    ) -> dict[str, Any]:
        ds = await _dataset(request, p, ref, project)
        if version is not None and version > ds["version"]:
            raise _err(
                404, f"dataset {ds['name']!r} has no version {version} (latest {ds['version']})", "not_found"
            )
        data = await _run(_evals(request).items, ds["id"], version, limit=limit, offset=offset)
        return {"dataset": ds["name"], "version": ds["version"] if version is None else version, "data": data}

    @r.post(
        "/datasets/{ref}/items",
        response_model=ItemsChanged,
        tags=["datasets"],
        summary="Add or replace items (a new version when anything changed)",
    )
    async def add_items(
        request: Request, ref: str, body: ItemsIn, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        require_write(p, "datasets")
        ds = await _dataset(request, p, ref, project)
        items = await _run(normalise_items, body.items)
        return await _run(_evals(request).add_items, ds["id"], items, replace=body.replace)

    @r.delete(
        "/datasets/{ref}/items/{item_id}",
        response_model=ItemsChanged,
        tags=["datasets"],
        summary="Remove an item",
    )
    async def remove_item(
        request: Request, ref: str, item_id: str, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        require_write(p, "datasets")
        ds = await _dataset(request, p, ref, project)
        out = await _run(_evals(request).remove_items, ds["id"], [item_id])
        if not out["removed"]:
            raise _err(404, f"item {item_id!r} not found in dataset {ds['name']!r}", "not_found")
        return out

    @r.post(
        "/datasets/{ref}/import",
        response_model=ItemsChanged,
        tags=["datasets"],
        summary="Import items from a JSONL, CSV or YAML body",
        openapi_extra={
            "requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}
        },
    )
    async def import_items(
        request: Request,
        ref: str,
        p: Caller,
        format: Annotated[str, Query(pattern="^(jsonl|csv|yaml|yml|json)$")] = "jsonl",
        replace: bool = False,
        create: bool = True,
        project: str | None = None,
    ) -> dict[str, Any]:
        require_write(p, "datasets")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_IMPORT_BYTES:
                raise _err(413, f"import larger than {MAX_IMPORT_BYTES} bytes", "request_too_large")
        items = await _run(parse_items, raw, format)
        store = _evals(request)
        found = await _run(store.find_dataset, _read_scope(request, p, project), ref)
        if found is None:
            if not create:
                raise _err(404, f"dataset {ref!r} not found", "dataset_not_found")
            pid = await _write_scope(request, p, project)
            found = await _run(store.ensure_dataset, pid, ref)
        return await _run(store.add_items, found["id"], items, replace=replace)

    @r.get(
        "/datasets/{ref}/export", tags=["datasets"], summary="Export a dataset version as JSONL, CSV or YAML"
    )
    async def export_items(
        request: Request,
        ref: str,
        p: Caller,
        format: Annotated[str, Query(pattern="^(jsonl|csv|yaml)$")] = "jsonl",
        version: Annotated[int | None, Query(ge=0)] = None,
        project: str | None = None,
    ) -> Response:
        ds = await _dataset(request, p, ref, project)
        items = await _run(_evals(request).items, ds["id"], version)
        body = await _run(dump_items, items, format)
        v = ds["version"] if version is None else version
        return Response(
            body,
            media_type=_MEDIA[format],
            headers={
                "content-disposition": f'attachment; filename="{ds["name"]}-v{v}.{format}"',
                "x-keel-dataset-version": str(v),
            },
        )

    @r.post(
        "/datasets/{ref}/items/from-traces",
        response_model=ItemsChanged,
        tags=["datasets"],
        summary="Add items made from stored traces (their request as input, reply as expected)",
    )
    async def items_from_traces(
        request: Request, ref: str, body: FromTraces, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        require_write(p, "datasets")
        store = request.app.state.keel.store
        scope = None if p.is_master else p.project_id
        items = []
        for tid in dict.fromkeys(t.lower() for t in body.trace_ids):
            trace = await run_in_threadpool(store.get_trace, tid, scope)
            if trace is None:
                raise _err(404, f"trace {tid!r} not found", "trace_not_found")
            try:
                items.append(item_from_trace(trace, expected_from_output=body.expected_from_output))
            except DatasetFormatError as exc:
                raise _err(400, str(exc), "trace_not_usable") from None
        evals = _evals(request)
        found = await _run(evals.find_dataset, _read_scope(request, p, project), ref)
        if found is None:
            if not body.create:
                raise _err(404, f"dataset {ref!r} not found", "dataset_not_found")
            if not _valid_name(ref):
                raise _err(400, "dataset names hold letters, digits, '_', '.', '-'", "invalid_name")
            found = await _run(evals.ensure_dataset, await _write_scope(request, p, project), ref)
        return await _run(evals.add_items, found["id"], items)

    # -- runs -----------------------------------------------------------------------------------

    @r.post(
        "/evals/runs", response_model=RunOut, status_code=201, tags=["evals"], summary="Start storing a run"
    )
    async def create_run(
        request: Request, body: RunIn, p: Caller, project: str | None = None
    ) -> dict[str, Any]:
        pid = await _write_scope(request, p, project, "evals")
        dataset = None
        if body.dataset is not None:
            dataset = await _dataset(request, p, body.dataset)
            if body.dataset_version is not None:
                if body.dataset_version > dataset["version"]:
                    raise _err(400, f"dataset has no version {body.dataset_version}", "invalid_version")
                dataset = {**dataset, "version": body.dataset_version}
        return await _run(
            _evals(request).create_run,
            pid,
            suite=body.suite,
            label=body.label,
            dataset=dataset,
            config=body.config,
            item_count=body.item_count,
        )

    @r.post("/evals/runs/{run_id}/results", tags=["evals"], summary="Append results to a running run")
    async def add_results(request: Request, run_id: str, body: ResultsIn, p: Caller) -> dict[str, Any]:
        require_write(p, "evals")
        run = await _eval_run(request, p, run_id)
        rows = [x.model_dump(exclude_none=False) for x in body.results]
        for row in rows:
            row["scores"] = {
                k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in row["scores"].items()
            }
            if row["trace_id"]:
                row["trace_id"] = row["trace_id"].lower()
        n = await _run(_evals(request).add_results, run["id"], rows)
        return {"id": run["id"], "result_count": n}

    @r.post(
        "/evals/runs/{run_id}/finish",
        response_model=RunOut,
        tags=["evals"],
        summary="Close a run: summary stored, cost totalled from its traces",
    )
    async def finish_run(request: Request, run_id: str, body: FinishIn, p: Caller) -> dict[str, Any]:
        require_write(p, "evals")
        run = await _eval_run(request, p, run_id)
        if run["id"] != run_id:
            raise _err(404, f"eval run {run_id!r} not found", "run_not_found")
        evals = _evals(request)
        # the gateway writes traces in the background: give the writer a moment to store this run's
        if body.status == "completed":
            await _traces_stored(evals, run_id)
        return await _run(
            evals.finish_run,
            run_id,
            status=body.status,
            summary=body.summary,
            extra_cost_usd=body.scoring_cost_usd,
        )

    @r.get("/evals/runs", response_model=list[RunOut], tags=["evals"], summary="List runs, newest first")
    async def list_runs(
        request: Request,
        p: Caller,
        suite: str | None = None,
        label: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        project: str | None = None,
    ) -> list[dict[str, Any]]:
        return await _run(
            _evals(request).list_runs, _read_scope(request, p, project), suite=suite, label=label, limit=limit
        )

    @r.get("/evals/runs/{ref}", response_model=RunOut, tags=["evals"], summary="A run by id or label")
    async def get_run(request: Request, ref: str, p: Caller) -> dict[str, Any]:
        return await _eval_run(request, p, ref)

    @r.get("/evals/runs/{ref}/results", tags=["evals"], summary="Every result of a run")
    async def run_results(request: Request, ref: str, p: Caller) -> dict[str, Any]:
        run = await _eval_run(request, p, ref)
        return {"run": run["id"], "data": await _run(_evals(request).results, run["id"])}

    @r.post(
        "/evals/runs/{run_id}/gate",
        tags=["evals"],
        summary="Gate a run against a baseline on the server and record the verdict on the run",
    )
    async def gate_run(request: Request, run_id: str, body: GateIn, p: Caller) -> dict[str, Any]:
        from keel.evals.gate import gate_failures
        from keel.store import utcnow

        require_write(p, "evals")
        head = await _eval_run(request, p, run_id)
        if head["status"] != "completed":
            raise KeelError(
                f"run {run_id!r} is {head['status']}: only a completed run can be gated",
                status=409,
                code="run_not_completed",
            )
        cmp = await compare_refs(request, p, body.baseline, head["id"], items=False)
        gate = {
            "baseline": body.baseline,
            "passed": bool(cmp.get("passed")),
            "failures": gate_failures(cmp),
            "at": utcnow().isoformat(),
        }
        await _run(_evals(request).record_gate, head["id"], gate)
        return gate

    @r.delete("/evals/runs/{run_id}", response_model=RunOut, tags=["evals"], summary="Delete a run")
    async def delete_run(request: Request, run_id: str, p: Caller) -> dict[str, Any]:
        require_write(p, "evals")
        run = await _eval_run(request, p, run_id)
        await _run(_evals(request).delete_run, run["id"])
        return run

    @r.get(
        "/evals/compare",
        tags=["evals"],
        summary="Compare two runs per scorer (paired bootstrap CIs) and item by item",
    )
    async def compare(
        request: Request,
        p: Caller,
        base: Annotated[str, Query(description="Baseline run id or label.")],
        head: Annotated[str, Query(description="Run id or label compared with the baseline.")],
        items: bool = True,
        confidence: Annotated[float | None, Query(gt=0.5, lt=1)] = None,
    ) -> dict[str, Any]:
        return await compare_refs(request, p, base, head, items=items, confidence=confidence)

    return r


async def _traces_stored(evals: EvalStore, run_id: str) -> None:
    """Wait (bounded) until the trace writer has stored every trace the run's results name."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINISH_WAIT_S
    while await _run(evals.missing_traces, run_id):
        if loop.time() >= deadline:
            return  # costs of traces still queued are left out rather than holding the client
        await asyncio.sleep(0.05)


def _valid_name(name: str) -> bool:
    return re.fullmatch(_NAME, name) is not None


async def compare_refs(
    request: Request,
    p: Principal,
    base: str,
    head: str,
    *,
    items: bool = True,
    confidence: float | None = None,
) -> dict[str, Any]:
    """The comparison of two runs (ids or labels) visible to ``p``; used by the API and the UI."""
    b = await _eval_run(request, p, base)
    h = await _eval_run(request, p, head)
    evals = _evals(request)
    b_rows = await _run(evals.results, b["id"])
    h_rows = await _run(evals.results, h["id"])
    return await run_in_threadpool(compare_runs, b, b_rows, h, h_rows, items=items, confidence=confidence)
