"""What a prompt version is: its template, declared variables and config, validated and hashed.

A version is immutable once stored.  ``normalise`` turns what a client pushed (YAML or JSON, loosely
shaped) into the canonical form that is stored, hashed and rendered; every problem is a
:class:`~keel.errors.BadRequest` naming the field.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from keel.errors import BadRequest

__all__ = [
    "LABEL_RE",
    "NAME_RE",
    "REQUEST_PARAMS",
    "ROLES",
    "TYPES",
    "VARIABLE_TYPES",
    "LabelState",
    "Variable",
    "Version",
    "check_label",
    "check_name",
    "content_hash",
    "normalise",
    "normalise_split",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TYPES = ("text", "chat")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
VARIABLE_TYPES = ("string", "number", "integer", "boolean", "list", "object", "any")
# config keys that are OpenAI chat-completions parameters: applied to gateway requests and by
# the SDK's compile(); other config keys are kept on the version as information only
REQUEST_PARAMS = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "n",
        "reasoning_effort",
        "modalities",
        "prediction",
        "service_tier",
    }
)


@dataclass(frozen=True, slots=True)
class Variable:
    """A declared template variable."""

    name: str
    type: str = "string"
    required: bool = True
    default: Any = None
    description: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        if self.default is not None:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class Version:
    """One stored, immutable prompt version."""

    name: str
    version: int
    type: str
    template: Any  # text: str; chat: list of {"role", "content"} or {"placeholder": name}
    variables: tuple[Variable, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    commit_message: str | None = None
    author: str | None = None
    created_at: str | None = None
    content_hash: str = ""

    def request_config(self) -> dict[str, Any]:
        """The config keys that are chat-completions parameters."""
        return {k: v for k, v in self.config.items() if k in REQUEST_PARAMS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "type": self.type,
            "template": self.template,
            "variables": [v.as_dict() for v in self.variables],
            "config": self.config,
            "metadata": self.metadata,
            "commit_message": self.commit_message,
            "author": self.author,
            "created_at": self.created_at,
            "content_hash": self.content_hash,
        }


@dataclass(frozen=True, slots=True)
class LabelState:
    """Where a label points: one version, or a weighted split between versions (a canary)."""

    label: str
    version: int
    split: tuple[tuple[int, float], ...] = ()  # ((version, weight), ...); empty: all traffic to version
    updated_at: str | None = None
    updated_by: str | None = None
    eval_run: str | None = None

    def versions(self) -> list[int]:
        return [v for v, _ in self.split] if self.split else [self.version]

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "version": self.version,
            "split": [{"version": v, "weight": w} for v, w in self.split] or None,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
            "eval_run": self.eval_run,
        }


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(
            "prompt name must be 1-200 characters: letters, digits and . _ - (starting with a letter or digit)",
            code="invalid_prompt",
            param="name",
        )
    return name


def check_label(label: Any) -> str:
    if not isinstance(label, str) or not LABEL_RE.match(label):
        raise BadRequest(
            f"label {label!r} is invalid: 1-64 lowercase letters, digits and . _ -",
            code="invalid_label",
            param="label",
        )
    if label == "latest":
        raise BadRequest(
            "'latest' is implicit (the newest version) and cannot be moved",
            code="invalid_label",
            param="label",
        )
    return label


def _variables(raw: Any) -> list[Variable]:
    """Variables as a list of objects, or a mapping name → type name or spec object."""
    if raw is None:
        return []
    items: list[tuple[str, Any]]
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for i, spec in enumerate(raw):
            if isinstance(spec, str):
                items.append((spec, {}))
            elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
                items.append((spec["name"], {k: v for k, v in spec.items() if k != "name"}))
            else:
                raise BadRequest(
                    f"variables[{i}] must be a name or an object with a 'name'",
                    code="invalid_prompt",
                    param=f"variables[{i}]",
                )
    else:
        raise BadRequest("'variables' must be a list or a mapping", code="invalid_prompt", param="variables")
    out: list[Variable] = []
    seen: set[str] = set()
    for name, spec in items:
        where = f"variables.{name}"
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise BadRequest(
                f"variable name {name!r} is not an identifier", code="invalid_prompt", param="variables"
            )
        if name in seen:
            raise BadRequest(f"variable {name!r} is declared twice", code="invalid_prompt", param=where)
        seen.add(name)
        if isinstance(spec, str):
            spec = {"type": spec}
        elif spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise BadRequest(
                f"variable {name!r}: expected a type name or an object", code="invalid_prompt", param=where
            )
        unknown = set(spec) - {"type", "required", "default", "description"}
        if unknown:
            raise BadRequest(
                f"variable {name!r}: unknown field(s) {', '.join(sorted(unknown))}",
                code="invalid_prompt",
                param=where,
            )
        vtype = spec.get("type", "string")
        if vtype not in VARIABLE_TYPES:
            raise BadRequest(
                f"variable {name!r}: type must be one of {', '.join(VARIABLE_TYPES)}",
                code="invalid_prompt",
                param=f"{where}.type",
            )
        default = spec.get("default")
        required = spec.get("required", default is None)
        if not isinstance(required, bool):
            raise BadRequest(
                f"variable {name!r}: 'required' must be a boolean",
                code="invalid_prompt",
                param=f"{where}.required",
            )
        if default is not None:
            from keel.prompts.render import type_problem

            problem = type_problem(vtype, default)
            if problem:
                raise BadRequest(
                    f"variable {name!r}: default {problem}", code="invalid_prompt", param=f"{where}.default"
                )
        desc = spec.get("description")
        out.append(Variable(name, vtype, required, default, desc if isinstance(desc, str) else None))
    return out


def _template(ptype: str, template: Any, messages: Any) -> Any:
    if ptype == "text":
        value = template if template is not None else messages
        if not isinstance(value, str) or not value:
            raise BadRequest(
                "a text prompt needs 'template': a non-empty string", code="invalid_prompt", param="template"
            )
        return value
    value = messages if messages is not None else template
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "a chat prompt needs 'messages': a non-empty list of {role, content}",
            code="invalid_prompt",
            param="messages",
        )
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if isinstance(m, dict) and set(m) == {"placeholder"} and isinstance(m["placeholder"], str):
            out.append({"placeholder": m["placeholder"]})
            continue
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(
                f"{where} must be an object with a role ({', '.join(sorted(ROLES))}) and a content string, "
                "or {placeholder: variable}",
                code="invalid_prompt",
                param=where,
            )
        if not isinstance(m.get("content"), str):
            raise BadRequest(
                f"{where}.content must be a string", code="invalid_prompt", param=f"{where}.content"
            )
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BadRequest(
                f"{where}: unknown field(s) {', '.join(sorted(extra))}", code="invalid_prompt", param=where
            )
        out.append(dict(m))
    return out


def normalise(
    ptype: Any,
    *,
    template: Any = None,
    messages: Any = None,
    variables: Any = None,
    config: Any = None,
    metadata: Any = None,
) -> tuple[str, Any, list[Variable], dict[str, Any], dict[str, Any]]:
    """Validate a pushed prompt; returns (type, template, variables, config, metadata).

    Variables the template uses but does not declare are declared as required, of type ``any``;
    a declared variable the template never uses is allowed (it may be used by a later version).
    """
    if ptype not in TYPES:
        raise BadRequest("'type' must be 'text' or 'chat'", code="invalid_prompt", param="type")
    tpl = _template(ptype, template, messages)
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise BadRequest("'config' must be an object", code="invalid_prompt", param="config")
    if "model" in config and (not isinstance(config["model"], str) or not config["model"]):
        raise BadRequest("config.model must be a model name", code="invalid_prompt", param="config.model")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object", code="invalid_prompt", param="metadata")
    declared = _variables(variables)
    from keel.prompts.render import template_variables

    used = template_variables(ptype, tpl)
    names = {v.name for v in declared}
    placeholders = {m["placeholder"] for m in tpl if "placeholder" in m} if ptype == "chat" else set()
    for name in sorted(used - names):
        declared.append(Variable(name, "list" if name in placeholders else "any", True))
    return ptype, tpl, declared, config, metadata


def normalise_split(raw: Any) -> list[tuple[int, float]]:
    """A traffic split: [{version, weight}, ...] with positive weights and distinct versions."""
    if not isinstance(raw, list) or len(raw) < 1:
        raise BadRequest("'split' must be a non-empty list of {version, weight}", code="invalid_split")
    out: list[tuple[int, float]] = []
    for i, item in enumerate(raw):
        v = item.get("version") if isinstance(item, dict) else None
        w = item.get("weight") if isinstance(item, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadRequest(f"split[{i}].version must be a version number", code="invalid_split")
        if not isinstance(w, int | float) or isinstance(w, bool) or w <= 0:
            raise BadRequest(f"split[{i}].weight must be a positive number", code="invalid_split")
        if any(v == x for x, _ in out):
            raise BadRequest(f"version {v} appears twice in the split", code="invalid_split")
        out.append((v, float(w)))
    return out


def content_hash(
    ptype: str, template: Any, variables: list[Variable], config: dict[str, Any], metadata: dict[str, Any]
) -> str:
    """What makes two pushes "the same version" (commit message and author do not count)."""
    doc = {
        "type": ptype,
        "template": template,
        "variables": [v.as_dict() for v in variables],
        "config": config,
        "metadata": metadata,
    }
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
