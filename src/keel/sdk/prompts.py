"""Prompts from keel's registry in your application: cached, refreshed in the background, safe offline.

    import keel.sdk as keel

    prompt = keel.prompts.get("support-answer", label="production")
    reply = client.chat.completions.create(**prompt.compile(question="Where is my order?"))

``get`` answers from a TTL cache; once an entry is older than ``ttl_s`` the cached prompt is still
returned at once and a background thread fetches a fresh one (stale-while-revalidate).  When the
server cannot be reached, the last version fetched is used, else a local fallback: the ``fallback``
argument or a prompt file (the YAML of ``keel prompts sync``) in ``fallback_dir``.
``compile(**variables)`` renders in the same sandbox as the server (Jinja2, strict variables) and
records the prompt's name and version on the current OpenTelemetry span.
Depends only on httpx (plus Jinja2 and PyYAML, which keel itself needs).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from keel.errors import BadRequest, KeelError, NotFound

__all__ = ["Prompt", "PromptClient", "configure", "get"]

log = logging.getLogger("keel.sdk.prompts")

# config keys that are chat-completions parameters (the rest of a version's config is information)
_REQUEST_PARAMS = frozenset(
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
_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}
_env: Any = None


def _jinja() -> Any:
    global _env
    if _env is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
        )
    return _env


@dataclass(frozen=True)
class Prompt:
    """One prompt version as served by keel (or taken from the local fallback)."""

    name: str
    version: int | None  # None: a local fallback that is not a stored version
    type: str
    template: Any
    variables: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    source: str = "server"  # server | cache | fallback

    @classmethod
    def from_api(cls, d: dict[str, Any], label: str | None, source: str = "server") -> Prompt:
        return cls(
            name=d["name"],
            version=d.get("version"),
            type=d.get("type") or ("text" if isinstance(d.get("template"), str) else "chat"),
            template=d["template"] if "template" in d else d.get("messages"),
            variables=_variables(d.get("variables")),
            config=dict(d.get("config") or {}),
            label=label,
            source=source,
        )

    def compile(self, **variables: Any) -> dict[str, Any]:
        """Provider-ready request fields: ``messages`` plus the version's config (model, temperature, ...).

        A missing or mistyped variable raises :class:`keel.errors.BadRequest` naming it.
        """
        values = dict(variables)
        for var in self.variables:
            name, vtype = var["name"], var.get("type", "any")
            if values.get(name) is None:
                if var.get("default") is not None:
                    values[name] = var["default"]
                elif var.get("required", True):
                    raise BadRequest(
                        f"prompt '{self.name}': missing variable '{name}'", code="missing_prompt_variable"
                    )
                else:
                    values[name] = None
            elif vtype in _TYPES and not _TYPES[vtype](values[name]):
                raise BadRequest(
                    f"prompt '{self.name}': variable '{name}' must be of type {vtype}",
                    code="invalid_prompt_variable",
                )
        if self.type == "text":
            messages = [{"role": "user", "content": self._render(self.template, values)}]
        else:
            messages = []
            for m in self.template:
                if "placeholder" in m:
                    messages.extend(dict(x) for x in values.get(m["placeholder"]) or [])
                else:
                    messages.append({**m, "content": self._render(m["content"], values)})
        self._record_on_span()
        return {**{k: v for k, v in self.config.items() if k in _REQUEST_PARAMS}, "messages": messages}

    def _render(self, source: str, values: dict[str, Any]) -> str:
        from jinja2 import TemplateError

        try:
            return str(_jinja().from_string(source).render(values))
        except TemplateError as exc:
            raise BadRequest(f"prompt '{self.name}': {exc}", code="template_error") from None

    def _record_on_span(self) -> None:
        try:
            from opentelemetry import trace

            span = trace.get_current_span()
            if span.is_recording():
                span.set_attribute("keel.prompt.name", self.name)
                if self.version is not None:
                    span.set_attribute("keel.prompt.version", self.version)
        except Exception:  # recording is best effort: never break the application
            log.debug("could not record the prompt on the current span", exc_info=True)


def _variables(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, dict):
        return [{"name": k, **({"type": v} if isinstance(v, str) else (v or {}))} for k, v in raw.items()]
    return [dict(v) if isinstance(v, dict) else {"name": v} for v in raw or []]


class PromptClient:
    """Fetches prompts from keel's ``/api/prompts`` with a TTL cache and offline fallbacks."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        ttl_s: float = 60.0,
        timeout_s: float = 5.0,
        fallback_dir: str | Path | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("KEEL_BASE_URL") or "http://127.0.0.1:4000").rstrip("/")
        key = api_key or os.environ.get("KEEL_API_KEY") or ""
        self.ttl_s = ttl_s
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
        )
        self._cache: dict[tuple[str, str, int | None, str | None], tuple[Prompt, float]] = {}
        self._refreshing: set[tuple[str, str, int | None, str | None]] = set()
        self._lock = threading.Lock()
        self.fetches = 0  # requests made to the server (for tests and metrics)

    def get(
        self,
        name: str,
        label: str = "production",
        *,
        version: int | None = None,
        user: str | None = None,
        fallback: str | dict[str, Any] | None = None,
    ) -> Prompt:
        """The prompt ``label`` (or ``version``) serves; ``user`` keeps a canary sticky for that end user."""
        key = (name, label, version, user)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            prompt, at = hit
            if time.monotonic() - at >= self.ttl_s:
                self._refresh_in_background(key)
            return prompt
        try:
            return self._fetch(key)
        except _Unreachable as exc:
            local = self._fallback(name, label, fallback)
            if local is None:
                raise KeelError(
                    f"keel at {self.base_url} is unreachable ({exc}) and prompt '{name}' has no local fallback",
                    status=503,
                    code="prompts_unreachable",
                ) from None
            log.warning("keel unreachable (%s); using the local fallback of prompt %r", exc, name)
            return local

    def _fetch(self, key: tuple[str, str, int | None, str | None]) -> Prompt:
        name, label, version, user = key
        params: dict[str, Any] = {"label": label}
        if version is not None:
            params["version"] = version
        if user is not None:
            params["user"] = user
        self.fetches += 1
        try:
            r = self._http.get(f"/api/prompts/{name}/resolve", params=params)
        except httpx.HTTPError as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from None
        if r.status_code >= 500:
            raise _Unreachable(f"HTTP {r.status_code}")
        if r.status_code != 200:
            try:
                err = r.json()["error"]
                message, code = err["message"], err.get("code")
            except Exception:
                message, code = r.text[:200], None
            if r.status_code == 404:
                raise NotFound(message, code=code)
            raise KeelError(message, status=r.status_code, code=code)
        prompt = Prompt.from_api(r.json(), label if version is None else None)
        with self._lock:
            self._cache[key] = (prompt, time.monotonic())
        return prompt

    def _refresh_in_background(self, key: tuple[str, str, int | None, str | None]) -> None:
        with self._lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def run() -> None:
            try:
                self._fetch(key)
            except Exception as exc:  # keep serving the stale prompt; try again on a later get()
                log.warning("refreshing prompt %r failed: %s", key[0], exc)
            finally:
                with self._lock:
                    self._refreshing.discard(key)

        threading.Thread(target=run, name="keel-prompt-refresh", daemon=True).start()

    def _fallback(self, name: str, label: str, given: str | dict[str, Any] | None) -> Prompt | None:
        if isinstance(given, str):
            return Prompt(name, None, "text", given, source="fallback", label=label)
        if isinstance(given, dict):
            return Prompt.from_api({"name": name, **given}, label, source="fallback")
        if self.fallback_dir is None:
            return None
        import yaml

        for path in sorted(self.fallback_dir.rglob("*")):
            if path.suffix not in (".yaml", ".yml") or not path.is_file():
                continue
            try:
                doc = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and doc.get("name", path.stem) == name:
                return Prompt.from_api({"name": name, **doc}, label, source="fallback")
        return None

    def close(self) -> None:
        self._http.close()


class _Unreachable(Exception):
    pass


_default: PromptClient | None = None


def configure(**kw: Any) -> PromptClient:
    """Replace the default client used by :func:`get` (same arguments as :class:`PromptClient`)."""
    global _default
    if _default is not None:
        _default.close()
    _default = PromptClient(**kw)
    return _default


def get(name: str, label: str = "production", **kw: Any) -> Prompt:
    """``keel.sdk.prompts.get(name, label="production")`` with the default client (KEEL_BASE_URL, KEEL_API_KEY)."""
    global _default
    if _default is None:
        _default = PromptClient()
    return _default.get(name, label, **kw)
