"""Eval pages: runs, a run's results, two runs side by side (deltas with CIs, per-item diff), datasets.

Also the trace page's "Add to dataset" action (a form post, same-origin only, needs the right to
change datasets like the API's ``POST /api/datasets/{id}/items/from-traces``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from keel.errors import KeelError
from keel.evals.compare import compare_runs
from keel.evals.datasets import DatasetFormatError, dump_items, item_from_trace
from keel.server.access import can_write
from keel.store.evals import EvalStore
from keel.types import Principal
from keel.ui.context import UIContext

__all__ = ["build"]

MAX_FORM_BYTES = 16 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "yaml": "application/yaml"}
MAX_ITEMS_SHOWN = 500


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def _scorer_names(run: dict[str, Any]) -> list[str]:
    variants = (run.get("summary") or {}).get("variants") or {}
    return sorted({s for v in variants.values() for s in v.get("scores", {})})


def build(ui: UIContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def evals(request: Request) -> EvalStore:
        return EvalStore(ui.state(request).store.engine)

    def page(request: Request, p: Principal, tpl: str, status: int = 200, **ctx: Any) -> Response:
        return ui.render(request, tpl, status=status, who=ui.who(request, p), **ctx)

    def missing(request: Request, p: Principal, what: str) -> Response:
        return page(request, p, "evals_missing.html", status=404, what=what)

    @r.get("/evals")
    async def runs_page(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        suite = request.query_params.get("suite") or None
        store = evals(request)
        runs = await run_in_threadpool(store.list_runs, ui.scope(p), suite=suite, limit=200)
        datasets = await run_in_threadpool(store.list_datasets, ui.scope(p))
        return page(
            request,
            p,
            "evals.html",
            runs=runs,
            datasets=datasets,
            suite=suite,
            scorer_names={run["id"]: _scorer_names(run) for run in runs},
        )

    @r.get("/evals/runs/{run_id}")
    async def run_page(request: Request, run_id: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = evals(request)
        run = await run_in_threadpool(store.get_run, ui.scope(p), run_id)
        if run is None:
            return missing(request, p, f"eval run {run_id}")
        results = await run_in_threadpool(store.results, run["id"])
        others = await run_in_threadpool(store.list_runs, ui.scope(p), suite=run["suite"], limit=50)
        return page(
            request,
            p,
            "eval_run.html",
            run=run,
            results=results[:2000],
            truncated=len(results) > 2000,
            scorer_names=_scorer_names(run),
            others=[o for o in others if o["id"] != run["id"]],
        )

    @r.get("/evals/compare")
    async def compare_page(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        q = request.query_params
        base_ref, head_ref = q.get("base", ""), q.get("head", "")
        store = evals(request)
        base = await run_in_threadpool(store.get_run, ui.scope(p), base_ref) if base_ref else None
        head = await run_in_threadpool(store.get_run, ui.scope(p), head_ref) if head_ref else None
        if base is None or head is None:
            return missing(request, p, f"eval run {base_ref if base is None else head_ref}")
        b_rows = await run_in_threadpool(store.results, base["id"])
        h_rows = await run_in_threadpool(store.results, head["id"])
        cmp = await run_in_threadpool(compare_runs, base, b_rows, head, h_rows)
        only_changed = q.get("changed") == "1"
        for pair in cmp["pairs"]:
            rows = pair["items"]
            if only_changed:
                rows = [x for x in rows if x["changed"] or any(d for d in x["delta"].values())]
            pair["shown"] = rows[:MAX_ITEMS_SHOWN]
            pair["hidden"] = max(0, len(rows) - MAX_ITEMS_SHOWN)
        return page(request, p, "eval_compare.html", cmp=cmp, base=base, head=head, only_changed=only_changed)

    @r.get("/evals/datasets/{ref}")
    async def dataset_page(request: Request, ref: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        store = evals(request)
        try:
            ds = await run_in_threadpool(store.find_dataset, ui.scope(p), ref)
        except KeelError:
            ds = None
        if ds is None:
            return missing(request, p, f"dataset {ref}")
        raw = request.query_params.get("version", "")
        version = int(raw) if raw.isdigit() and 0 < int(raw) <= ds["version"] else ds["version"]
        items = await run_in_threadpool(store.items, ds["id"], version, limit=MAX_ITEMS_SHOWN + 1)
        return page(
            request,
            p,
            "eval_dataset.html",
            ds=ds,
            version=version,
            items=items[:MAX_ITEMS_SHOWN],
            more=len(items) > MAX_ITEMS_SHOWN,
            notice=request.query_params.get("notice"),
            error=request.query_params.get("error"),
        )

    @r.get("/evals/datasets/{ref}/export")
    async def dataset_export(request: Request, ref: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in _MEDIA:
            return Response("format must be jsonl, csv or yaml", status_code=400)
        store = evals(request)
        ds = await run_in_threadpool(store.find_dataset, ui.scope(p), ref)
        if ds is None:
            return missing(request, p, f"dataset {ref}")
        raw = request.query_params.get("version", "")
        version = int(raw) if raw.isdigit() and 0 < int(raw) <= ds["version"] else ds["version"]
        items = await run_in_threadpool(store.items, ds["id"], version)
        body = dump_items(items, fmt)
        return Response(
            body,
            media_type=_MEDIA[fmt],
            headers={"content-disposition": f'attachment; filename="{ds["name"]}-v{version}.{fmt}"'},
        )

    @r.post("/evals/datasets/add-trace")
    async def add_trace(request: Request) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                return Response("form too large", status_code=413)
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        trace_id = form.get("trace_id", "").strip().lower()
        name = form.get("dataset", "").strip()
        back = f"/traces/{quote(trace_id)}" if re.fullmatch(r"[0-9a-f]{32}", trace_id) else "/traces"
        if not _NAME.match(name):
            return RedirectResponse(f"{back}?error={quote('Dataset names hold letters, digits, _ . -')}", 303)
        if not can_write(p, "datasets"):
            msg = (
                "Adding to a dataset needs the master key, a key with the admin scope or the developer role."
            )
            return RedirectResponse(f"{back}?error={quote(msg)}", 303)
        state = ui.state(request)
        trace = await run_in_threadpool(state.store.get_trace, trace_id, ui.scope(p))
        if trace is None:
            return RedirectResponse(f"{back}?error={quote('trace not found')}", 303)
        try:
            item = item_from_trace(trace)
        except DatasetFormatError as exc:
            return RedirectResponse(f"{back}?error={quote(str(exc))}", 303)
        store = evals(request)
        pid = p.project_id if not p.is_master else None
        if pid is None:
            pid = trace.get("project_id") or await run_in_threadpool(state.store.ensure_project, "default")
        try:
            ds = await run_in_threadpool(store.ensure_dataset, pid, name)
            res = await run_in_threadpool(store.add_items, ds["id"], [item])
        except KeelError as err:
            return RedirectResponse(f"{back}?error={quote(err.message)}", 303)
        what = "added" if res["added"] else "already in the dataset"
        notice = f"trace {trace_id[:12]} {what} (version {res['version']})"
        return RedirectResponse(f"/evals/datasets/{quote(ds['id'])}?notice={quote(notice)}", 303)

    return r
