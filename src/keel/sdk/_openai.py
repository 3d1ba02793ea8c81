"""OpenAI clients that call through keel's gateway and carry the app's trace context.

Each request gets the W3C ``traceparent`` of the current span (so the gateway's LLM span is its
child) and the session, tags and metadata in effect (the ``x-keel-*`` headers the gateway reads),
added by an httpx request hook.  Headers the caller set on a request are left alone.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any

import httpx
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from keel.sdk import _context, _runtime
from keel.sdk._export import warn_once

if TYPE_CHECKING:
    import openai

__all__ = ["async_openai_client", "gateway_headers", "openai_client", "wrap_openai"]

_propagator = TraceContextTextMapPropagator()


def gateway_headers() -> dict[str, str]:
    """The headers that tie a gateway call to the current span: traceparent and x-keel-*."""
    out: dict[str, str] = {}
    try:
        _propagator.inject(out)
        p = _context.current()
        if p.session:
            out["x-keel-session-id"] = p.session
        if p.user:
            out["x-keel-user"] = p.user
        if p.tags:  # the gateway splits on commas
            out["x-keel-tags"] = ",".join(t.replace(",", " ") for t in p.tags)
        if p.metadata:
            out["x-keel-metadata"] = json.dumps(p.metadata, default=str, separators=(",", ":"))
    except Exception:
        _runtime.count_error("gateway_headers")
    return out


def _on_request(request: httpx.Request) -> None:
    try:
        for name, value in gateway_headers().items():
            if name not in request.headers:
                request.headers[name] = value
    except Exception:
        _runtime.count_error("openai.request_hook")


async def _on_request_async(request: httpx.Request) -> None:
    _on_request(request)


def _add_hook(http_client: Any) -> bool:
    """Add the request hook to an httpx (or httpx-compatible) client; False if it has no hooks."""
    hooks = getattr(http_client, "event_hooks", None)
    if not isinstance(hooks, dict):
        return False
    hook = (
        _on_request_async if inspect.iscoroutinefunction(getattr(http_client, "send", None)) else _on_request
    )
    current = list(hooks.get("request", []))
    if hook not in current:
        http_client.event_hooks = {**hooks, "request": [*current, hook]}
    return True


def wrap_openai(client: Any) -> Any:
    """Make an existing ``openai.OpenAI``/``AsyncOpenAI`` client (already pointed at keel) propagate
    the current span and session/tags/metadata on every request; returns the same client."""
    try:
        if not _add_hook(getattr(client, "_client", None)):
            warn_once("wrap_openai", "keel sdk: cannot add trace propagation to %r", type(client).__name__)
    except Exception:
        _runtime.count_error("wrap_openai")
    return client


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    rt = _runtime.active()
    url = _runtime.resolve_base_url(base_url or (rt.config.base_url if rt else None))
    key = _runtime.resolve_api_key(api_key) or (rt.config.api_key if rt else None)
    return f"{url}/v1", key or "missing-keel-api-key"


def openai_client(base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> openai.OpenAI:
    """An ``openai.OpenAI`` client for keel's gateway (``<base_url>/v1``, the keel key), propagating
    trace context. Defaults come from :func:`keel.sdk.init`, then KEEL_BASE_URL / KEEL_API_KEY.
    Other keyword arguments go to ``openai.OpenAI``. Needs the ``openai`` package."""
    import openai

    url, key = _settings(base_url, api_key)
    http = kwargs.pop("http_client", None) or openai.DefaultHttpxClient()
    _add_hook(http)
    return openai.OpenAI(base_url=url, api_key=key, http_client=http, **kwargs)


def async_openai_client(
    base_url: str | None = None, api_key: str | None = None, **kwargs: Any
) -> openai.AsyncOpenAI:
    """Like :func:`openai_client`, for ``openai.AsyncOpenAI``."""
    import openai

    url, key = _settings(base_url, api_key)
    http = kwargs.pop("http_client", None) or openai.DefaultAsyncHttpxClient()
    _add_hook(http)
    return openai.AsyncOpenAI(base_url=url, api_key=key, http_client=http, **kwargs)
