"""GET /api/traces/export: a filtered trace set as JSON Lines or CSV, streamed batch by batch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from keel.server.api import Caller, _parse_time, _project_id
from keel.store import TraceFilter
from keel.store.export import INCLUDES, csv_chunks, iter_trace_batches, jsonl_chunks

__all__ = ["build_router"]

_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def _bad(message: str) -> HTTPException:
    return HTTPException(
        400, detail={"message": message, "type": "invalid_request_error", "code": "invalid_request"}
    )


def parse_include(raw: str | None, fmt: str) -> set[str]:
    """The ``include`` list (spans, scores), checked; JSONL only."""
    wanted = {x.strip() for x in (raw or "").split(",") if x.strip()}
    unknown = wanted - set(INCLUDES)
    if unknown:
        raise _bad(f"include: unknown {', '.join(sorted(unknown))} (known: {', '.join(INCLUDES)})")
    if wanted and fmt != "jsonl":
        raise _bad("include: spans and scores are exported in JSONL only (CSV rows are flat)")
    return wanted


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get(
        "/traces/export",
        tags=["traces"],
        summary="Export traces as JSONL or CSV (streamed; the filters of GET /api/traces)",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "JSON Lines (one trace per line) or CSV with a header row.",
                "content": {"application/x-ndjson": {}, "text/csv": {}},
            }
        },
    )
    def export_traces(
        request: Request,
        p: Caller,
        format: Annotated[str, Query(pattern="^(jsonl|csv)$", description="jsonl or csv")] = "jsonl",
        include: Annotated[
            str | None,
            Query(description="JSONL only: comma-separated `spans`, `scores` to embed in each trace"),
        ] = None,
        model: str | None = None,
        status: Annotated[str | None, Query(pattern="^(ok|error)$")] = None,
        user: str | None = None,
        session: str | None = None,
        tag: str | None = None,
        prompt: str | None = Query(default=None, description="Registry prompt name"),
        prompt_version: Annotated[int | None, Query(ge=1, description="Version of `prompt`")] = None,
        start: Annotated[str | None, Query(description="ISO 8601; traces starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; traces starting before")] = None,
        project: str | None = Query(default=None, description="Project id or name (master key only)"),
        limit: Annotated[int | None, Query(ge=1, description="Export at most this many traces")] = None,
    ) -> StreamingResponse:
        store = request.app.state.keel.store
        wanted = parse_include(include, format)
        pid = p.project_id if not p.is_master else (_project_id(store, project) if project else None)
        f = TraceFilter(
            project_id=pid,
            model=model,
            status=status,
            user=user,
            session=session,
            tag=tag,
            prompt_name=prompt,
            prompt_version=prompt_version,
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        batches = iter_trace_batches(
            store, f, limit=limit, spans="spans" in wanted, scores="scores" in wanted
        )
        chunks = jsonl_chunks(batches) if format == "jsonl" else csv_chunks(batches)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            chunks,  # a sync iterator: Starlette runs each step (a database page) in a worker thread
            media_type=_MEDIA[format],
            headers={"content-disposition": f'attachment; filename="traces-{stamp}.{format}"'},
        )

    return r
