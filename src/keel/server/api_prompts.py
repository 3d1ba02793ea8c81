"""/api/prompts: the prompt registry over HTTP (push, versions, labels, rollback, diff, render, metrics).

Prompts belong to a project: a key reads (and, with the ``admin`` scope, writes) its own project's
prompts; the master key works in the project named by ``?project=`` (default: ``default``).
Every write is in the prompt's history with the key that made it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from keel.errors import KeelError
from keel.prompts import PromptRegistry, Version
from keel.prompts.diff import diff_versions
from keel.server.access import require_project, require_write
from keel.server.api import _parse_time, principal_from_request
from keel.store.prompts import PromptStore
from keel.types import Principal

__all__ = ["build_router"]

T = TypeVar("T")
Caller = Annotated[Principal, Depends(principal_from_request)]


class PromptPush(BaseModel):
    """A prompt version as pushed (YAML files of `keel prompts sync` have the same fields)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Prompt name: letters, digits and . _ -")
    type: str = Field(default="chat", description="text or chat")
    template: str | None = Field(default=None, description="Text prompts: the Jinja2 template.")
    messages: list[dict[str, Any]] | None = Field(
        default=None,
        description="Chat prompts: [{role, content}] (content is a template) or {placeholder: var}.",
    )
    variables: list[Any] | dict[str, Any] | None = Field(
        default=None, description="Declared variables: name → type or {type, required, default, description}."
    )
    config: dict[str, Any] | None = Field(
        default=None, description="model, temperature, max_tokens, tools, response_format, ..."
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Owner, use case, anything else.")
    commit_message: str | None = Field(default=None, max_length=5000)
    author: str | None = Field(default=None, max_length=256, description="Default: the pushing key.")
    labels: list[str] | None = Field(default=None, description="Labels to point at this version.")


class LabelMove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=1, description="Point the label at this version.")
    split: list[dict[str, Any]] | None = Field(
        default=None, description="Or split traffic: [{version, weight}, ...] (sticky per end user)."
    )
    eval_run: str | None = Field(
        default=None, max_length=200, description="Evaluation run that approves the move (protected labels)."
    )


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_version: int | None = Field(default=None, ge=1, description="Default: where the label pointed before.")


class Protect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[str]


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(default=None, ge=1)
    label: str | None = None
    variables: dict[str, Any] = Field(default_factory=dict)


ProjectRef = Annotated[
    str | None, Query(description="Project id or name (master key only; default: `default`)")
]


def _project_id(request: Request, p: Principal, project: str | None) -> str:
    """The project whose prompts a request works on: the key's own, or the master key's choice."""
    store = request.app.state.keel.store
    if not p.is_master:
        if project is not None:
            found = store.get_project(project)
            require_project(p, found["id"] if found else None)
        return str(p.project_id)
    ref = project or "default"
    found = store.get_project(ref)
    if found is not None:
        return str(found["id"])
    if ref == "default":
        return str(store.ensure_project(ref))
    raise HTTPException(
        404,
        detail={
            "message": f"project {ref!r} not found",
            "type": "invalid_request_error",
            "code": "not_found",
        },
    )


def _registry(request: Request, p: Principal, project: str | None = None) -> PromptRegistry:
    pid = _project_id(request, p, project)
    return PromptRegistry(PromptStore(request.app.state.keel.store.engine, pid))


def _http(err: KeelError) -> HTTPException:
    return HTTPException(
        err.status,
        detail={"message": err.message, "type": err.type, "code": err.code, "param": err.param},
    )


async def _run(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except KeelError as err:
        raise _http(err) from None


def _actor(p: Principal) -> str:
    if p.user_name:
        return f"user:{p.user_name}"
    return "master" if p.is_master else f"{p.name or 'key'} ({p.key_id})"


def _admin(p: Principal) -> None:
    require_write(p, "prompts")


async def _changed(request: Request) -> None:
    cache = request.app.state.keel.gateway.prompts
    if cache is not None:
        await cache.changed()


def _version_ref(registry: PromptRegistry, name: str, ref: str) -> Version:
    """A version by number, label or 'latest'."""
    if ref.isdigit():
        return registry.version(name, int(ref))
    return registry.version(name, label=ref)


def build_router() -> APIRouter:
    r = APIRouter(prefix="/api/prompts", tags=["prompts"])

    @r.get("", summary="List prompts with their labels")
    async def list_prompts(request: Request, p: Caller, project: ProjectRef = None) -> list[dict[str, Any]]:
        return await _run(_registry(request, p, project).store.list_prompts)

    @r.post("", status_code=201, summary="Push a version (nothing is created when it equals the newest)")
    async def push(
        request: Request, body: PromptPush, p: Caller, response: Response, project: ProjectRef = None
    ) -> dict[str, Any]:
        _admin(p)
        actor = _actor(p)
        version, created = await _run(
            _registry(request, p, project).push,
            body.name,
            body.type,
            template=body.template,
            messages=body.messages,
            variables=body.variables,
            config=body.config,
            metadata=body.metadata,
            commit_message=body.commit_message,
            author=body.author or actor,
            labels=body.labels,
            actor=actor,
        )
        if not created:
            response.status_code = 200
        if created or body.labels:
            await _changed(request)
        return {**version.as_dict(), "created": created}

    @r.get("/{name}", summary="A prompt: labels and version history")
    async def get_prompt(
        request: Request, name: str, p: Caller, project: ProjectRef = None
    ) -> dict[str, Any]:
        reg = _registry(request, p, project)

        def load() -> dict[str, Any]:
            prompt = reg.store.get_prompt(name)
            if prompt is None:
                raise KeelError(f"prompt '{name}' not found", status=404, code="prompt_not_found")
            versions = reg.store.versions(name)
            by_version: dict[int, list[str]] = {}
            for lb in prompt["labels"]:
                for x in lb["split"] or [{"version": lb["version"]}]:
                    by_version.setdefault(x["version"], []).append(lb["label"])
            prompt["versions"] = [
                {
                    "version": v["version"],
                    "commit_message": v["commit_message"],
                    "author": v["author"],
                    "created_at": v["created_at"],
                    "labels": sorted(by_version.get(v["version"], []))
                    + (["latest"] if v["version"] == prompt["latest_version"] else []),
                }
                for v in versions
            ]
            return prompt

        return await _run(load)

    @r.get("/{name}/versions/{ref}", summary="One version by number, label or 'latest'")
    async def get_version(
        request: Request, name: str, ref: str, p: Caller, project: ProjectRef = None
    ) -> dict[str, Any]:
        version = await _run(_version_ref, _registry(request, p, project), name, ref)
        return version.as_dict()

    @r.get("/{name}/resolve", summary="The version a label serves (sticky canary pick per user)")
    async def resolve(
        request: Request,
        name: str,
        p: Caller,
        project: ProjectRef = None,
        label: str = "production",
        version: Annotated[int | None, Query(ge=1)] = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        cache = request.app.state.keel.gateway.prompts
        try:
            pid = await run_in_threadpool(_project_id, request, p, project)
            compiled = cache.resolve(
                name, label=label, version=version, user=user or p.end_user, project_id=pid
            )
        except KeelError as err:
            raise _http(err) from None
        return {**compiled.version.as_dict(), "label": label if version is None else None}

    @r.put("/{name}/labels/{label}", summary="Move a label (a deploy), or split its traffic (a canary)")
    async def move_label(
        request: Request, name: str, label: str, body: LabelMove, p: Caller, project: ProjectRef = None
    ) -> dict[str, Any]:
        _admin(p)
        state = await _run(
            _registry(request, p, project).set_label,
            name,
            label,
            version=body.version,
            split=body.split,
            actor=_actor(p),
            eval_run=body.eval_run,
        )
        await _changed(request)
        return {"prompt": name, **state.as_dict()}

    @r.post("/{name}/labels/{label}/rollback", summary="Move a label back to where it pointed before")
    async def rollback(
        request: Request,
        name: str,
        label: str,
        p: Caller,
        project: ProjectRef = None,
        body: Rollback | None = None,
    ) -> dict[str, Any]:
        _admin(p)
        state = await _run(
            _registry(request, p, project).rollback,
            name,
            label,
            actor=_actor(p),
            to_version=body.to_version if body else None,
        )
        await _changed(request)
        return {"prompt": name, **state.as_dict()}

    @r.delete("/{name}/labels/{label}", status_code=204, summary="Remove a label")
    async def remove_label(
        request: Request, name: str, label: str, p: Caller, project: ProjectRef = None
    ) -> Response:
        _admin(p)
        await _run(_registry(request, p, project).store.remove_label, name, label, actor=_actor(p))
        await _changed(request)
        return Response(status_code=204)

    @r.put("/{name}/protected", summary="Labels that move only with a linked evaluation run")
    async def protect(
        request: Request, name: str, body: Protect, p: Caller, project: ProjectRef = None
    ) -> dict[str, Any]:
        _admin(p)
        from keel.prompts.model import check_label

        def run() -> dict[str, Any]:
            for label in body.labels:
                check_label(label)
            return _registry(request, p, project).store.set_protected(name, body.labels, actor=_actor(p))

        return await _run(run)

    @r.get("/{name}/history", summary="Audit log: versions created, label moves and rollbacks")
    async def history(
        request: Request,
        name: str,
        p: Caller,
        project: ProjectRef = None,
        label: str | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> list[dict[str, Any]]:
        return await _run(_registry(request, p, project).store.history, name, label, limit)

    @r.get("/{name}/diff", summary="Unified diff of template and config between two versions or labels")
    async def diff(
        request: Request,
        name: str,
        p: Caller,
        a: Annotated[str, Query(alias="from", description="Version number, label or 'latest'")],
        b: Annotated[str, Query(alias="to", description="Version number, label or 'latest'")] = "latest",
        project: ProjectRef = None,
    ) -> dict[str, Any]:
        reg = _registry(request, p, project)
        va = await _run(_version_ref, reg, name, a)
        vb = await _run(_version_ref, reg, name, b)
        return diff_versions(va, vb)

    @r.post("/{name}/render", summary="Render a version with variables (nothing is sent to a model)")
    async def render(
        request: Request, name: str, body: RenderRequest, p: Caller, project: ProjectRef = None
    ) -> dict[str, Any]:
        reg = _registry(request, p, project)
        version = await _run(reg.version, name, body.version, body.label)
        from keel.prompts.render import render as do_render

        try:
            out = do_render(version, body.variables)
        except KeelError as err:
            raise _http(err) from None
        return {
            "name": out.name,
            "version": out.version,
            "messages": out.messages,
            "config": out.config,
            "text": out.text,
        }

    @r.get("/{name}/metrics", summary="Per version: requests, errors, latency, tokens, cost, mean scores")
    async def metrics(
        request: Request,
        name: str,
        p: Caller,
        project: ProjectRef = None,
        start: Annotated[str | None, Query(description="ISO 8601; calls starting at or after")] = None,
        end: Annotated[str | None, Query(description="ISO 8601; calls starting before")] = None,
    ) -> dict[str, Any]:
        reg = _registry(request, p, project)
        rows = await _run(
            reg.store.metrics,
            name,
            project_id=None if p.is_master else p.project_id,
            start=_parse_time(start, "start"),
            end=_parse_time(end, "end"),
        )
        return {"prompt": name, "versions": rows}

    return r
