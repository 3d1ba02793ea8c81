"""Review pages: annotation queues, and a reviewer page to score traces with the keyboard.

``/review`` lists the queues (and creates one); ``/review/{queue}`` shows a queue's items, picks
traces into it and sends reviewed items to a dataset; ``/review/{queue}/items/{item}`` shows one
trace's conversation with a score form.  Shortcuts (static/review.js): j/k next/previous, 1-5 or
y/n score, c comment, s submit.  Every form also works without JavaScript.  Writes need what the
API's do (``annotations``, keel.server.access).
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from keel.errors import KeelError
from keel.evals import review
from keel.server.access import can_write
from keel.ui import views
from keel.ui.context import UIContext

__all__ = ["build"]

MAX_FORM_BYTES = 64 * 1024
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
_SCORE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
ItemId = Annotated[int, Path(ge=1, le=2**53)]


async def _form(request: Request) -> dict[str, str]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            raise KeelError("that form was too large", status=413, code="request_too_large")
    return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def _back(url: str, *, notice: str | None = None, error: str | None = None) -> Response:
    q = f"?notice={quote(notice)}" if notice else f"?error={quote(error)}" if error else ""
    return RedirectResponse(url + q, status_code=303)


def build(ui: UIContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def store(request: Request) -> Any:
        return ui.state(request).store

    def page(request: Request, tpl: str, status: int = 200, **ctx: Any) -> Response:
        p = ui.principal(request)
        assert p is not None
        q = request.query_params
        return ui.render(
            request,
            tpl,
            status=status,
            who=ui.who(request, p),
            notice=q.get("notice"),
            error=q.get("error"),
            **ctx,
        )

    def missing(request: Request, what: str) -> Response:
        return page(request, "review_missing.html", status=404, what=what)

    @r.get("/review")
    async def queues(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        rows = await run_in_threadpool(review.list_queues, store(request), ui.scope(p))
        return page(request, "review_queues.html", queues=rows)

    @r.post("/review")
    async def create_queue(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        try:
            form = await _form(request)
        except KeelError as err:
            return Response(err.message, status_code=err.status)
        if not can_write(p, "annotations"):
            return _back("/review", error="Creating queues needs the right to change annotations.")
        name = form.get("name", "").strip()
        score_name = form.get("score_name", "").strip() or "quality"
        score_type = form.get("score_type", "scale")
        if not name or len(name) > 200:
            return _back("/review", error="A queue needs a name (up to 200 characters).")
        if not _SCORE_NAME.match(score_name):
            return _back("/review", error="The score name may use letters, digits and _ . : - only.")
        if score_type not in review.SCORE_TYPES:
            return _back("/review", error="Unknown score type.")
        if not p.is_master and p.project_id is None:
            return _back("/review", error="This key belongs to no project.")
        q = await run_in_threadpool(
            lambda: review.create_queue(
                store(request),
                name=name,
                score_name=score_name,
                score_type=score_type,
                description=form.get("description", "").strip() or None,
                project_id=ui.scope(p),
            )
        )
        return _back(f"/review/{q['id']}", notice=f"Queue {name} created.")

    @r.get("/review/{queue_id}")
    async def queue_page(request: Request, queue_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        q = await run_in_threadpool(review.get_queue, store(request), queue_id, ui.scope(p))
        if q is None:
            return missing(request, "queue")
        rows = await run_in_threadpool(lambda: review.list_items(store(request), queue_id, limit=500))
        first = await run_in_threadpool(review.first_item, store(request), queue_id)
        return page(request, "review_queue.html", queue=q, items=rows, first=first)

    @r.post("/review/{queue_id}/items")
    async def pick_traces(request: Request, queue_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        back = f"/review/{quote(queue_id)}"
        if not can_write(p, "annotations"):
            return _back(back, error="Adding traces needs the right to change annotations.")
        try:
            form = await _form(request)
            ids = [t.lower() for t in _TRACE_ID.findall(form.get("trace_ids", ""))]
            if not ids:
                return _back(back, error="Paste one or more trace ids (32 hex digits).")
            out = await run_in_threadpool(
                lambda: review.add_items(store(request), queue_id, ids, project_id=ui.scope(p))
            )
        except KeelError as err:
            return _back(back, error=err.message)
        msg = f"{out['added']} trace(s) added."
        if out["not_found"]:
            msg += f" {len(out['not_found'])} not found."
        if out["already_queued"]:
            msg += f" {len(out['already_queued'])} already queued."
        return _back(back, notice=msg)

    @r.post("/review/{queue_id}/dataset")
    async def to_dataset(request: Request, queue_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        back = f"/review/{quote(queue_id)}"
        if not (can_write(p, "annotations") and can_write(p, "datasets")):
            return _back(
                back, error="Sending to a dataset needs the right to change annotations and datasets."
            )
        try:
            form = await _form(request)
            name = form.get("dataset", "").strip()
            if not name or len(name) > 200:
                return _back(back, error="Name the dataset (up to 200 characters).")
            out = await run_in_threadpool(
                lambda: review.send_to_dataset(store(request), queue_id, name, project_id=ui.scope(p))
            )
        except KeelError as err:
            return _back(back, error=err.message)
        return _back(
            back,
            notice=f"Dataset {name} v{out['version']}: {out['added']} added, {out['updated']} updated, "
            f"{out['unchanged']} unchanged.",
        )

    @r.get("/review/{queue_id}/items/{item_id}")
    async def item_page(request: Request, queue_id: str, item_id: ItemId) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        item = await run_in_threadpool(review.get_item, store(request), item_id, ui.scope(p))
        if item is None or item["queue_id"] != queue_id:
            return missing(request, "item")
        nav = await run_in_threadpool(review.neighbours, store(request), item)
        trace = await run_in_threadpool(
            lambda: store(request).get_trace(item["trace_id"], project_id=ui.scope(p))
        )
        llm = [s for s in (trace or {}).get("spans", []) if s.get("kind") == "llm"]
        span = llm[-1] if llm else ((trace or {}).get("spans") or [None])[-1]
        return page(
            request,
            "review_item.html",
            queue=item["queue"],
            item=item,
            nav=nav,
            trace=trace,
            span=span,
            inputs=views.input_messages(span.get("input")) if span else None,
            outputs=views.output_messages(span.get("output")) if span else None,
        )

    @r.post("/review/{queue_id}/items/{item_id}")
    async def submit(request: Request, queue_id: str, item_id: ItemId) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        here = f"/review/{quote(queue_id)}/items/{item_id}"
        if not can_write(p, "annotations"):
            return _back(here, error="Reviewing needs the right to change annotations.")
        try:
            form = await _form(request)
            skip = form.get("action") == "skip"
            if not skip and not form.get("value"):
                return _back(here, error="Pick a score first (keys 1-5 or y/n).")
            item = await run_in_threadpool(
                lambda: review.review_item(
                    store(request),
                    item_id,
                    value=form.get("value"),
                    comment=form.get("comment", "").strip() or None,
                    reviewer=p.user_name or p.name or p.key_id or ("master" if p.is_master else None),
                    skip=skip,
                    project_id=ui.scope(p),
                )
            )
        except KeelError as err:
            return _back(here, error=err.message)
        full = await run_in_threadpool(review.get_item, store(request), item_id, ui.scope(p))
        nav = await run_in_threadpool(review.neighbours, store(request), full or item)
        nxt = nav["next_pending"]
        if nxt is None:
            return _back(f"/review/{quote(queue_id)}", notice="Queue done: nothing left to review.")
        return RedirectResponse(f"/review/{quote(queue_id)}/items/{nxt}", status_code=303)

    return r
