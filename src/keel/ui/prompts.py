"""Prompt registry pages: list, version history with labels (who moved them, when), side-by-side diff,
label moves and rollbacks, and a playground that runs a version through the gateway.

Writes need what the API's do (keel.server.access).  The playground calls the gateway in-process, with
the signed-in key, so a run is authenticated, limited, priced and traced like any other request.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from keel.errors import KeelError
from keel.pricing import price
from keel.prompts import PromptRegistry, Version
from keel.prompts.diff import config_text, side_by_side, template_text
from keel.server.access import can_write
from keel.store.prompts import PromptStore
from keel.types import Principal, Usage
from keel.ui.context import UIContext

__all__ = ["build"]

MAX_FORM_BYTES = 256 * 1024


def _registry(ui: UIContext, request: Request) -> PromptRegistry:
    """The registry of the signed-in principal's project (the master key: the ``default`` project)."""
    p = ui.principal(request)
    store = ui.state(request).store
    pid = p.project_id if p is not None and not p.is_master else store.ensure_project("default")
    return PromptRegistry(PromptStore(store.engine, pid))


def _actor(p: Principal) -> str:
    if p.user_name:
        return f"user:{p.user_name}"
    return "master" if p.is_master else f"{p.name or 'key'} ({p.key_id})"


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


def _parse_value(vtype: str, text: str) -> Any:
    """A playground field as the variable's type: strings as typed, everything else as JSON."""
    if vtype == "string":
        return text
    if text.strip() == "":
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text if vtype == "any" else _Invalid(text)


class _Invalid(str):
    """A field that is not valid JSON for a non-string variable (reported by the renderer's type check)."""


def build(ui: UIContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def page(request: Request, tpl: str, **ctx: Any) -> Response:
        p = ui.principal(request)
        assert p is not None
        return ui.render(request, tpl, who=ui.who(request, p), can_write=can_write(p, "prompts"), **ctx)

    @r.get("/prompts")
    def list_prompts(request: Request) -> Response:
        if ui.principal(request) is None:
            return ui.to_login(request)
        rows = _registry(ui, request).store.list_prompts()
        return page(request, "prompts.html", rows=rows)

    @r.get("/prompts/{name}")
    def prompt_page(request: Request, name: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        reg = _registry(ui, request)
        prompt = reg.store.get_prompt(name)
        if prompt is None:
            return page(request, "prompt_missing.html", status=404, name=name)
        versions = reg.store.versions(name)
        sel_raw = request.query_params.get("version", "")
        selected = next(
            (v for v in versions if str(v["version"]) == sel_raw), versions[0] if versions else None
        )
        pointing: dict[int, list[str]] = {}
        for lb in prompt["labels"]:
            for x in lb["split"] or [{"version": lb["version"]}]:
                pointing.setdefault(x["version"], []).append(lb["label"])
        history = reg.store.history(name, limit=200)
        notice = request.query_params.get("notice")
        error = request.query_params.get("error")
        sel_version = reg.version(name, selected["version"]) if selected else None
        return page(
            request,
            "prompt.html",
            prompt=prompt,
            versions=versions,
            selected=selected,
            template_src=template_text(sel_version) if sel_version else "",
            config=config_text(sel_version) if sel_version else "",
            pointing=pointing,
            label_events=[e for e in history if e["label"]],
            history=history,
            notice=notice,
            error=error,
        )

    @r.get("/prompts/{name}/diff")
    def diff_page(request: Request, name: str) -> Response:
        if ui.principal(request) is None:
            return ui.to_login(request)
        reg = _registry(ui, request)
        prompt = reg.store.get_prompt(name)
        if prompt is None:
            return page(request, "prompt_missing.html", status=404, name=name)
        latest = int(prompt["latest_version"])
        q = request.query_params
        try:
            a = reg.version(name, int(q.get("from") or max(1, latest - 1)))
            b = reg.version(name, int(q.get("to") or latest))
        except (ValueError, KeelError):
            return page(request, "prompt_missing.html", status=404, name=name, detail="no such version")
        return page(
            request,
            "prompt_diff.html",
            prompt=prompt,
            a=a,
            b=b,
            versions=list(range(latest, 0, -1)),
            template_rows=side_by_side(template_text(a), template_text(b)),
            config_rows=side_by_side(config_text(a), config_text(b)),
        )

    async def write(request: Request, name: str, action: Any) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        back = f"/prompts/{quote(name)}"
        if not _same_origin(request):
            return Response("cross-site form post refused", status_code=403)
        if not can_write(p, "prompts"):
            msg = "Moving labels needs the master key, a key with the admin scope or the developer role."
            return RedirectResponse(f"{back}?error={quote(msg)}", status_code=303)
        try:
            form = await _form(request)
            notice = await action(form, _actor(p))
        except KeelError as err:
            return RedirectResponse(f"{back}?error={quote(err.message)}", status_code=303)
        cache = ui.state(request).gateway.prompts
        if cache is not None:
            await cache.changed()
        return RedirectResponse(f"{back}?notice={quote(notice)}", status_code=303)

    @r.post("/prompts/{name}/labels")
    async def move_label(request: Request, name: str) -> Response:
        reg = _registry(ui, request)

        async def action(form: dict[str, str], actor: str) -> str:
            label = form.get("label", "").strip()
            try:
                version = int(form.get("version", ""))
                canary = int(form["canary"]) if form.get("canary") else None
                weight = float(form.get("weight") or 10)
            except ValueError:
                raise KeelError("version and weight must be numbers", status=400) from None
            if canary is not None and canary != version:
                if not 0 < weight < 100:
                    raise KeelError("the canary weight must be between 0 and 100", status=400)
                split = [{"version": version, "weight": 100 - weight}, {"version": canary, "weight": weight}]
                await run_in_threadpool(
                    reg.set_label,
                    name,
                    label,
                    split=split,
                    actor=actor,
                    eval_run=form.get("eval_run") or None,
                )
                return f"{label}: v{version} {100 - weight:g}% / v{canary} {weight:g}% (canary)"
            await run_in_threadpool(
                reg.set_label,
                name,
                label,
                version=version,
                actor=actor,
                eval_run=form.get("eval_run") or None,
            )
            return f"{label} now points at version {version}"

        return await write(request, name, action)

    @r.post("/prompts/{name}/rollback")
    async def rollback(request: Request, name: str) -> Response:
        reg = _registry(ui, request)

        async def action(form: dict[str, str], actor: str) -> str:
            label = form.get("label", "").strip()
            state = await run_in_threadpool(reg.rollback, name, label, actor=actor)
            return f"{label} rolled back to version {state.version}"

        return await write(request, name, action)

    @r.api_route("/prompts/{name}/playground", methods=["GET", "POST"])
    async def playground(request: Request, name: str) -> Response:
        p = ui.principal(request)
        if p is None:
            return ui.to_login(request)
        state = ui.state(request)
        reg = _registry(ui, request)
        prompt = await run_in_threadpool(reg.store.get_prompt, name)
        if prompt is None:
            return page(request, "prompt_missing.html", status=404, name=name)
        form: dict[str, str] = {}
        if request.method == "POST":
            if not _same_origin(request):
                return Response("cross-site form post refused", status_code=403)
            try:
                form = await _form(request)
            except KeelError as err:
                return Response(err.message, status_code=err.status)
        try:
            vnum = int(form.get("version") or request.query_params.get("version") or prompt["latest_version"])
            version: Version = await run_in_threadpool(reg.version, name, vnum)
        except (ValueError, KeelError):
            version = await run_in_threadpool(reg.version, name, int(prompt["latest_version"]))
        models = [n for n in state.models.names() if p.may_use(n)]
        model = form.get("model") or version.config.get("model") or (models[0] if models else "")
        values = {v.name: form.get(f"var_{v.name}", "") for v in version.variables}
        result = None
        if request.method == "POST" and p.user_name is not None:  # the gateway takes keys, not sessions
            result = {
                "status": 403,
                "error": "The playground calls models with an API key: sign in with one.",
            }
        elif request.method == "POST":
            key = request.cookies.get("keel_key", "")
            result = await _run(state, name, version, model, values, key)
        return page(
            request,
            "prompt_playground.html",
            prompt=prompt,
            version=version,
            versions=list(range(int(prompt["latest_version"]), 0, -1)),
            models=models,
            model=model,
            values=values,
            result=result,
        )

    return r


async def _run(
    state: Any, name: str, version: Version, model: str, values: dict[str, str], key: str
) -> dict[str, Any]:
    """Send the version through the gateway (in-process ASGI call with the user's key)."""
    variables = {}
    for v in version.variables:
        text = values.get(v.name, "")
        if text == "":  # an empty field is a missing variable (its default applies, or the run says so)
            continue
        variables[v.name] = _parse_value(v.type, text)
    body = {"model": model, "messages": [], "prompt_variables": variables, "prompt_version": version.version}
    headers = {"authorization": f"Bearer {key}", "x-keel-prompt": name, "x-keel-tags": "playground"}
    transport = httpx.ASGITransport(app=state.gateway.chat_completions)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(transport=transport, base_url="http://keel", timeout=120) as client:
        r = await client.post("/v1/chat/completions", content=orjson.dumps(body), headers=headers)
    latency_ms = (time.perf_counter() - t0) * 1000.0
    out: dict[str, Any] = {
        "status": r.status_code,
        "latency_ms": latency_ms,
        "trace_id": r.headers.get("x-keel-trace-id"),
    }
    try:
        data = r.json()
    except ValueError:
        data = {"error": {"message": r.text[:500]}}
    if r.status_code != 200:
        out["error"] = (data.get("error") or {}).get("message") or r.text[:500]
        return out
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    out["output"] = message.get("content")
    out["tool_calls"] = message.get("tool_calls")
    out["input_tokens"] = usage.get("prompt_tokens")
    out["output_tokens"] = usage.get("completion_tokens")
    deps = state.models.by_name.get(state.gateway.router.resolve(model) or model) or []
    if deps:
        cfg = deps[0].config
        out["cost_usd"] = price(
            cfg.upstream_model,
            cfg.provider,
            Usage(input_tokens=out["input_tokens"], output_tokens=out["output_tokens"]),
            deps[0].price_override,
        )
    return out
