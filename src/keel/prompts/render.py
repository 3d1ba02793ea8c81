"""Sandboxed rendering of prompt templates (Jinja2).

Templates run in Jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: conditionals,
loops and filters work; attributes that reach Python internals (``__class__``, ``__globals__``,
``mro`` ...) and methods that mutate values raise, and so does any undefined name
(:class:`~jinja2.StrictUndefined`).  Variables are checked against their declared types before
rendering; every failure is a :class:`~keel.errors.BadRequest` that names the variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import StrictUndefined, meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keel.errors import BadRequest
from keel.prompts.model import Version

__all__ = [
    "MAX_OUTPUT_CHARS",
    "CompiledPrompt",
    "Rendered",
    "compile_version",
    "render",
    "template_variables",
    "type_problem",
]

MAX_OUTPUT_CHARS = 1_000_000  # a rendered prompt larger than this is refused (runaway loops)
MAX_RANGE = 10_000


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise SecurityError(f"range() of more than {MAX_RANGE} items is not allowed")
    return r


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, auto_reload=False
    )
    env.globals["range"] = _range
    return env


_ENV = _make_env()


def type_problem(vtype: str, value: Any) -> str | None:
    """Why ``value`` is not of declared type ``vtype`` (None when it is)."""
    ok = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }.get(vtype)
    if ok is None or ok(value):
        return None
    return f"must be {'an' if vtype[0] in 'aeiou' else 'a'} {vtype}, got {_json_type(value)}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _parse(source: str, where: str) -> Any:
    try:
        return _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BadRequest(
            f"{where}: template syntax error on line {exc.lineno}: {exc.message}",
            code="invalid_template",
            param=where,
        ) from None


def template_variables(ptype: str, template: Any) -> set[str]:
    """The names a template reads (syntax errors are a BadRequest naming the message)."""
    if ptype == "text":
        return set(meta.find_undeclared_variables(_parse(template, "template")))
    names: set[str] = set()
    for i, m in enumerate(template):
        if "placeholder" in m:
            names.add(m["placeholder"])
        else:
            names |= meta.find_undeclared_variables(_parse(m["content"], f"messages[{i}].content"))
    return names - set(_ENV.globals)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered version: provider-ready messages plus the request config."""

    name: str
    version: int
    messages: list[dict[str, Any]]
    config: dict[str, Any]
    text: str | None = None  # text prompts: the rendered string


class CompiledPrompt:
    """A version with its templates compiled once (the gateway renders from these)."""

    __slots__ = ("_templates", "version")

    def __init__(self, version: Version) -> None:
        self.version = version
        if version.type == "text":
            self._templates: list[Any] = [_ENV.from_string(version.template)]
        else:
            self._templates = [
                None if "placeholder" in m else _ENV.from_string(m["content"]) for m in version.template
            ]

    def render(self, variables: dict[str, Any] | None) -> Rendered:
        v = self.version
        values = _check_variables(v, variables or {})
        if v.type == "text":
            text = _run(self._templates[0], values, "template")
            return Rendered(v.name, v.version, [{"role": "user", "content": text}], v.request_config(), text)
        messages: list[dict[str, Any]] = []
        for i, (m, tpl) in enumerate(zip(v.template, self._templates, strict=True)):
            if tpl is None:
                messages.extend(_placeholder(values, m["placeholder"]))
                continue
            out = {k: val for k, val in m.items() if k != "content"}
            out["content"] = _run(tpl, values, f"messages[{i}].content")
            messages.append(out)
        return Rendered(v.name, v.version, messages, v.request_config())


def compile_version(version: Version) -> CompiledPrompt:
    return CompiledPrompt(version)


def render(version: Version, variables: dict[str, Any] | None = None) -> Rendered:
    """Render ``version`` with ``variables``; a BadRequest names the missing or mistyped variable."""
    return CompiledPrompt(version).render(variables)


def _check_variables(v: Version, given: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise BadRequest("prompt variables must be an object", code="invalid_prompt_variables")
    values = dict(given)
    for var in v.variables:
        if var.name not in values or values[var.name] is None:
            if var.default is not None:
                values[var.name] = var.default
                continue
            if var.required:
                raise BadRequest(
                    f"prompt '{v.name}' version {v.version}: missing variable '{var.name}'"
                    + (f" ({var.type})" if var.type != "any" else ""),
                    code="missing_prompt_variable",
                    param=f"prompt_variables.{var.name}",
                )
            values[var.name] = None
            continue
        problem = type_problem(var.type, values[var.name])
        if problem:
            raise BadRequest(
                f"prompt '{v.name}' version {v.version}: variable '{var.name}' {problem}",
                code="invalid_prompt_variable",
                param=f"prompt_variables.{var.name}",
            )
    return values


def _placeholder(values: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = values.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, dict) and m.get("role") for m in value):
        raise BadRequest(
            f"variable '{name}' fills a message placeholder: it must be a list of messages with a role",
            code="invalid_prompt_variable",
            param=f"prompt_variables.{name}",
        )
    return [dict(m) for m in value]


def _run(tpl: Any, values: dict[str, Any], where: str) -> str:
    parts: list[str] = []
    size = 0
    try:
        for chunk in tpl.generate(values):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise BadRequest(
                    f"{where}: the rendered prompt exceeds {MAX_OUTPUT_CHARS} characters",
                    code="prompt_too_large",
                )
            parts.append(chunk)
    except jinja2.UndefinedError as exc:
        raise BadRequest(
            f"{where}: {exc.message}", code="missing_prompt_variable", param="prompt_variables"
        ) from None
    except SecurityError as exc:
        raise BadRequest(f"{where}: not allowed in a template: {exc}", code="template_not_allowed") from None
    except BadRequest:
        raise
    except Exception as exc:  # a filter on a wrong value, a division by zero, ...
        raise BadRequest(
            f"{where}: rendering failed: {type(exc).__name__}: {exc}", code="template_error"
        ) from None
    return "".join(parts)
