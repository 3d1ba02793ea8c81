"""POST /v1/traces: OTLP/HTTP trace export (protobuf or JSON, optionally gzip) into keel's trace store.

Answers per the OTLP/HTTP spec: an ExportTraceServiceResponse in the request's encoding (with
``partial_success`` when some spans were rejected), and a ``google.rpc.Status`` body on errors:
400 undecodable, 401 no or bad key, 413 too large, 415 unsupported content type or encoding,
503 with ``Retry-After`` when the trace queue cannot take the whole export (nothing of it is queued,
so the client's retry duplicates nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from google.rpc import status_pb2
from starlette.requests import ClientDisconnect

from keel.gateway.auth import bearer_token
from keel.tracing.otlp import (
    JSON,
    PROTOBUF,
    Origin,
    OTLPError,
    decode_export,
    encode_response,
    media_type,
    to_records,
)
from keel.types import Principal, SpanRecord

__all__ = ["build_router"]

log = logging.getLogger("keel.otlp")

DEFAULT_PROJECT = "default"
RETRY_AFTER_S = 2
# the gateway's spans keep this share of the trace queue to themselves: OTLP ingest never fills it
GATEWAY_RESERVE = 0.1
# google.rpc.Code of each HTTP status answered here
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 413: 8, 415: 3, 503: 14}
# exports read and decoded at once: bounds the memory held by bodies in flight (others wait, unread);
# decoding holds the GIL, so more at once would only contend with the event loop and the writer thread
MAX_CONCURRENT = 2
_PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")


# accepted spans must be stored even if keel is stopped right away: the trace writer drains for 30 s on
# shutdown, so ingest keeps no more queued than the writer stores in a third of that at its recent rate
DRAIN_BUDGET_S = 10.0
MIN_ALLOWANCE = 20_000  # until a rate is measured (and after idle spells, which under-measure it)


class DrainBudget:
    """How many spans may wait in the trace queue: what the writer stores in DRAIN_BUDGET_S."""

    def __init__(self, writer: Any, clock: Any = time.monotonic) -> None:
        self.writer = writer
        self.clock = clock
        self.rate: float | None = None  # spans/s the writer stored while it had work
        self._t = clock()
        self._written = writer.stats.written

    def allowance(self) -> int:
        now = self.clock()
        elapsed = now - self._t
        if elapsed >= 1.0:
            done = self.writer.stats.written - self._written
            if done and self.writer.depth:  # busy throughout: the rate is the writer's capacity
                r = done / elapsed
                self.rate = r if self.rate is None else 0.5 * self.rate + 0.5 * r
            self._t, self._written = now, self.writer.stats.written
        return max(MIN_ALLOWANCE, int((self.rate or 0.0) * DRAIN_BUDGET_S))


class _Counters:
    """OTLP ingest counters, exported in /metrics."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0
        self.refused = 0  # exports (requests), not spans


def _status(status: int, message: str, as_json: bool, headers: dict[str, str] | None = None) -> Response:
    code = _GRPC_CODES.get(status, 2)
    if as_json:
        body = orjson.dumps({"code": code, "message": message})
    else:
        body = status_pb2.Status(code=code, message=message).SerializeToString()
    return Response(body, status_code=status, media_type=JSON if as_json else PROTOBUF, headers=headers)


def _counters(state: Any) -> _Counters:
    c: _Counters | None = getattr(state, "otlp_counters", None)
    if c is None:
        c = state.otlp_counters = _Counters()
        state.stats.counters["keel_otlp_spans_accepted"] = (
            "Spans accepted by POST /v1/traces (each one is stored)",
            lambda: c.accepted,
        )
        state.stats.counters["keel_otlp_spans_rejected"] = (
            "Spans rejected by POST /v1/traces as invalid (reported to the client as partial success)",
            lambda: c.rejected,
        )
        state.stats.counters["keel_otlp_exports_refused"] = (
            "OTLP exports refused with 503 because the trace queue was full (the client retries them)",
            lambda: c.refused,
        )
    return c


class _Projects:
    """Project ids by name for master-key exports (``keel.project`` resource attribute), cached."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._ids: dict[str, str] = {}

    def resolve(self, ref: str) -> str:
        pid = self._ids.get(ref)
        if pid is None:
            found = self.store.get_project(ref)
            if found is None:
                try:
                    self.store.ensure_project(ref)
                except Exception:  # another replica created it at the same moment
                    pass
                found = self.store.get_project(ref)
                if found is None:
                    raise OTLPError(f"project {ref!r} cannot be created", 400)
            pid = self._ids[ref] = str(found["id"])
        return pid


def _origin_for(p: Principal, projects: _Projects) -> Any:
    if not p.is_master:
        origin = Origin(p.project_id, p.key_id, p.team_id, p.end_user)
        return lambda _resource: origin

    def resolve(resource: dict[str, Any]) -> Origin:
        ref = resource.get("keel.project")
        name = ref.strip()[:200] if isinstance(ref, str) and ref.strip() else DEFAULT_PROJECT
        return Origin(projects.resolve(name))

    return resolve


def _decode(
    body: bytes, ctype: str | None, cenc: str | None, limit: int, p: Principal, projects: _Projects
) -> tuple[list[SpanRecord], int, list[str], bool]:
    export = decode_export(body, ctype, cenc, limit)
    recs = to_records(export, _origin_for(p, projects))
    return recs, export.rejected, export.errors, export.json


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OTLPError(f"request body is larger than {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OTLPError(f"request body is larger than {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def build_router() -> APIRouter:
    r = APIRouter()

    @r.post(
        "/v1/traces",
        tags=["otlp"],
        summary="OTLP/HTTP trace export (protobuf or JSON, gzip allowed)",
        description=(
            "Send spans with any OpenTelemetry OTLP/HTTP exporter: `Authorization: Bearer <key>`, "
            "`Content-Type: application/x-protobuf` or `application/json`. Spans are stored under the "
            "key's project (master key: the `keel.project` resource attribute, else `default`)."
        ),
        response_class=Response,
        responses={200: {"description": "ExportTraceServiceResponse"}},
    )
    async def export_traces(request: Request) -> Response:
        state = request.app.state.keel
        ctype = request.headers.get("content-type")
        # errors answer in the request's encoding; a client that sent neither gets readable JSON
        as_json = (ctype or "").split(";", 1)[0].strip().lower() not in _PROTOBUF_TYPES
        counters = _counters(state)
        key = bearer_token(request.headers.get("authorization"))
        p = state.keys.lookup(key) if key else None
        if p is None:
            msg = "missing API key: send Authorization: Bearer <key>" if key is None else "invalid API key"
            return _status(401, msg, as_json)
        if "ingest" not in p.scopes:
            return _status(403, "this key lacks the 'ingest' scope", as_json)
        writer = state.writer
        budget = getattr(state, "otlp_budget", None)
        if budget is None:
            budget = state.otlp_budget = DrainBudget(writer)
        gateway_reserve = int(writer.max_queue * GATEWAY_RESERVE)
        # besides the gateway's share, ingest leaves what the writer could not drain in time
        reserve = max(gateway_reserve, writer.max_queue - budget.allowance())
        slots = getattr(state, "otlp_slots", None)
        if slots is None:
            slots = state.otlp_slots = asyncio.Semaphore(MAX_CONCURRENT)
        projects = getattr(state, "otlp_projects", None)
        if projects is None:
            projects = state.otlp_projects = _Projects(state.store)
        try:
            media_type(ctype)
            async with slots:
                limit = state.settings.max_request_bytes
                body = await _read_body(request, limit)
                if writer.depth and writer.depth >= writer.max_queue - reserve:  # refuse before decoding
                    counters.refused += 1
                    return _status(
                        503, "trace queue is full; retry later", as_json, {"retry-after": str(RETRY_AFTER_S)}
                    )
                # decoding and mapping are CPU work: off the event loop, which also serves the gateway
                recs, rejected, errors, as_json = await asyncio.to_thread(
                    _decode, body, ctype, request.headers.get("content-encoding"), limit, p, projects
                )
                if len(recs) > writer.max_queue - gateway_reserve:  # could never fit: retrying is futile
                    raise OTLPError(
                        f"export has {len(recs)} spans, more than the trace queue takes at once "
                        f"({writer.max_queue - gateway_reserve}); send smaller batches",
                        413,
                    )
                # an export always fits an empty queue, however large it is against the drain budget
                if recs and not writer.submit_all(recs, reserve if writer.depth else gateway_reserve):
                    counters.refused += 1
                    return _status(
                        503,
                        f"trace queue cannot take {len(recs)} spans now; retry later",
                        as_json,
                        {"retry-after": str(RETRY_AFTER_S)},
                    )
        except OTLPError as exc:
            return _status(exc.status, exc.message, as_json)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; nothing was queued
        counters.accepted += len(recs)
        counters.rejected += rejected
        message = "; ".join(errors) if rejected else ""
        return Response(
            encode_response(rejected, message, as_json),
            status_code=200,
            media_type=JSON if as_json else PROTOBUF,
        )

    return r
