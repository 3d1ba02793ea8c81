"""Gateway-side prompts: a request names a registry prompt instead of sending messages.

``{"model": "prompt:support-answer", "prompt_variables": {...}}`` (label from ``prompt_label`` or
the ``x-keel-prompt-label`` header, default ``production``; a version may be pinned with
``prompt_version`` / ``x-keel-prompt-version``) is rendered from the in-memory
:class:`~keel.prompts.PromptCache`: the version's config (model, temperature, tools, ...) is merged
under the request's own parameters, and messages the request does send are appended to the
rendered ones.  A request for a real model may instead name the prompt in the ``x-keel-prompt``
header: the prompt is rendered and the request's model is used.
"""

from __future__ import annotations

from typing import Any

from keel.errors import BadRequest
from keel.prompts import PromptCache
from keel.types import Principal

__all__ = ["DEFAULT_LABEL", "PREFIX", "apply_prompt"]

PREFIX = "prompt:"
DEFAULT_LABEL = "production"
_FIELDS = ("prompt_label", "prompt_variables", "prompt_version")


def apply_prompt(
    cache: PromptCache, body: dict[str, Any], headers: list[tuple[bytes, bytes]], principal: Principal | None
) -> tuple[dict[str, Any], tuple[str, int, str]] | None:
    """Render the prompt a request names; returns (new body, (name, version, label)), or None.

    Unknown prompt, label or version: a 404; a missing or mistyped variable: a 400 naming it.
    """
    model = body.get("model")
    by_model = isinstance(model, str) and model.startswith(PREFIX)
    name: str | None = model[len(PREFIX) :] if isinstance(model, str) and by_model else None
    label: str | None = None
    pinned: str | None = None
    header_user: str | None = None
    for k, v in headers:
        if k == b"x-keel-user":
            header_user = v.decode("utf-8", "replace")[:256]
        elif k.startswith(b"x-keel-prompt"):
            if k == b"x-keel-prompt" and name is None:
                name = v.decode("utf-8", "replace").strip()
            elif k == b"x-keel-prompt-label":
                label = v.decode("utf-8", "replace").strip()
            elif k == b"x-keel-prompt-version":
                pinned = v.decode("utf-8", "replace").strip()
    if not name:
        if by_model:
            raise BadRequest(
                'name the prompt: "model": "prompt:<name>"', code="invalid_prompt", param="model"
            )
        return None
    label = body.get("prompt_label", label) or DEFAULT_LABEL
    if not isinstance(label, str):
        raise BadRequest("'prompt_label' must be a string", code="invalid_request", param="prompt_label")
    version = _version(body.get("prompt_version", pinned))
    variables = body.get("prompt_variables")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise BadRequest(
            "'prompt_variables' must be an object", code="invalid_request", param="prompt_variables"
        )
    user = body.get("user")
    if not isinstance(user, str):  # the canary is sticky per end user: body, x-keel-user, or the key's user
        user = header_user or (principal.end_user if principal is not None else None)
    project = principal.project_id if principal is not None else None  # a key sees its project's prompts
    compiled = cache.resolve(name, label=label, version=version, user=user, project_id=project)
    rendered = compiled.render(variables)
    out = dict(rendered.config)
    out.update((k, v) for k, v in body.items() if k not in _FIELDS and k != "messages")
    if by_model:
        if not rendered.config.get("model"):
            raise BadRequest(
                f"prompt '{name}' version {rendered.version} sets no config.model; add one, or call a model "
                "and name the prompt in the x-keel-prompt header",
                code="prompt_without_model",
                param="model",
            )
        out["model"] = rendered.config["model"]
    extra = body.get("messages")
    out["messages"] = rendered.messages + (extra if isinstance(extra, list) else [])
    return out, (name, rendered.version, "version" if version is not None else label)


def _version(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise BadRequest(
        "'prompt_version' must be a version number", code="invalid_request", param="prompt_version"
    )
