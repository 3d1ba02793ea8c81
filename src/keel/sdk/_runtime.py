"""The SDK's one process-wide state: configuration, the tracer provider and the export queue."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from keel.sdk._export import ExportQueue, ExportStats, HttpExporter, warn_once

__all__ = [
    "DEFAULT_BASE_URL",
    "Config",
    "Runtime",
    "active",
    "count_error",
    "flush",
    "guarded",
    "init",
    "resolve_api_key",
    "resolve_base_url",
    "shutdown",
    "stats",
    "tracer",
]

log = logging.getLogger("keel.sdk")

DEFAULT_BASE_URL = "http://127.0.0.1:4000"
_SCOPE = "keel.sdk"
_NOOP_TRACER = trace.NoOpTracer()

P = ParamSpec("P")
R = TypeVar("R")


def resolve_base_url(base_url: str | None = None) -> str:
    """keel's root URL from the argument, else KEEL_BASE_URL, else the local default; no trailing /v1."""
    url = (base_url or os.environ.get("KEEL_BASE_URL") or DEFAULT_BASE_URL).strip().rstrip("/")
    return url.removesuffix("/v1")


def resolve_api_key(api_key: str | None = None) -> str | None:
    return api_key or os.environ.get("KEEL_API_KEY") or None


@dataclass(frozen=True, slots=True)
class Config:
    """The settings :func:`keel.sdk.init` was called with (after env and defaults)."""

    base_url: str
    api_key: str | None
    service_name: str
    project: str | None = None
    capture_input: bool = True
    capture_output: bool = True
    max_io_chars: int = 32_000
    max_queue_size: int = 2048
    max_batch_size: int = 512
    schedule_delay_s: float = 1.0
    export_timeout_s: float = 10.0
    shutdown_timeout_s: float = 5.0


class Runtime:
    """An initialised SDK: its own TracerProvider feeding a bounded export queue."""

    def __init__(self, config: Config, set_global_provider: bool = False) -> None:
        self.config = config
        attrs: dict[str, Any] = {"service.name": config.service_name}
        if config.project:
            attrs["keel.project"] = config.project
        self.exporter = HttpExporter(config.base_url, config.api_key, timeout_s=config.export_timeout_s)
        self.queue = ExportQueue(
            self.exporter,
            max_queue_size=config.max_queue_size,
            max_batch_size=config.max_batch_size,
            schedule_delay_s=config.schedule_delay_s,
            export_timeout_s=config.export_timeout_s,
            shutdown_timeout_s=config.shutdown_timeout_s,  # the provider's exit hook flushes this long
        )
        self.provider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(self.queue)
        self.tracer = self.provider.get_tracer(_SCOPE)
        if set_global_provider:
            trace.set_tracer_provider(self.provider)

    def shutdown(self, timeout_s: float) -> bool:
        done = self.queue.close(timeout_s)
        self.provider.shutdown()
        return done


_lock = threading.Lock()
_runtime: Runtime | None = None
_last: Runtime | None = None  # the most recent runtime, shut down or not: stats() still reads it
_errors = 0


def active() -> Runtime | None:
    return _runtime


def tracer() -> trace.Tracer:
    rt = _runtime
    return rt.tracer if rt is not None else _NOOP_TRACER


def count_error(where: str) -> None:
    """Record an SDK error that was swallowed so the application never sees it."""
    global _errors
    _errors += 1
    warn_once("error:" + where, "keel sdk: internal error in %s (ignored)", where)
    log.debug("keel sdk: error in %s", where, exc_info=True)


def guarded(default: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make an SDK entry point return ``default`` instead of raising into the application."""

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception:
                count_error(fn.__name__)
                return default  # type: ignore[no-any-return]

        return wrapper

    return deco


@guarded(None)
def init(
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    service_name: str | None = None,
    project: str | None = None,
    capture_input: bool = True,
    capture_output: bool = True,
    max_io_chars: int = 32_000,
    max_queue_size: int = 2048,
    max_batch_size: int = 512,
    schedule_delay_s: float = 1.0,
    export_timeout_s: float = 10.0,
    shutdown_timeout_s: float = 5.0,
    set_global_provider: bool = False,
) -> Config | None:
    """Start sending spans to keel; see docs/sdk.md. Calling it again replaces the previous set-up."""
    global _runtime, _last
    config = Config(
        base_url=resolve_base_url(base_url),
        api_key=resolve_api_key(api_key),
        service_name=service_name or os.environ.get("OTEL_SERVICE_NAME") or "keel-app",
        project=project,
        capture_input=capture_input,
        capture_output=capture_output,
        max_io_chars=max_io_chars,
        max_queue_size=max_queue_size,
        max_batch_size=max_batch_size,
        schedule_delay_s=schedule_delay_s,
        export_timeout_s=export_timeout_s,
        shutdown_timeout_s=shutdown_timeout_s,
    )
    with _lock:
        old, _runtime = _runtime, Runtime(config, set_global_provider)
        _last = _runtime
    if old is not None:
        old.shutdown(config.shutdown_timeout_s)
    return config


@guarded(True)
def flush(timeout: float = 5.0) -> bool:
    """Export every finished span; returns within ``timeout`` seconds, True when all were sent."""
    rt = _runtime
    return True if rt is None else rt.queue.flush(timeout)


@guarded(True)
def shutdown(timeout: float = 5.0) -> bool:
    """Flush (within ``timeout`` seconds) and stop exporting; spans after this are not sent."""
    global _runtime
    with _lock:
        rt, _runtime = _runtime, None
    return True if rt is None else rt.shutdown(timeout)


def stats() -> ExportStats:
    """Counters: queued, exported, dropped (queue full), failed (export gave up), errors."""
    rt = _last
    try:
        s = rt.queue.stats() if rt is not None else ExportStats()
        return ExportStats(s.queued, s.exported, s.dropped, s.failed, s.errors + _errors)
    except Exception:
        return ExportStats(errors=_errors)
