"""The app factory: `create_app(settings, store=..., factories=...)` builds keel's ASGI app.

The gateway's routes are served by raw ASGI handlers in front of FastAPI (nothing in their
way); everything else — /api, /metrics, /openapi.json, the UI — goes to the FastAPI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

import keel
from keel.config import SETTINGS, ModelConfig, Settings
from keel.gateway.asgi import Receive, Scope, Send, send_bytes
from keel.gateway.auth import KeyCache
from keel.gateway.cache import (
    ExactCache,
    MemoryExactCache,
    MemorySemanticIndex,
    RedisExactCache,
    RedisSemanticIndex,
    ResponseCache,
    SemanticCache,
    SemanticIndex,
)
from keel.gateway.core import Gateway
from keel.gateway.health import HealthBoard, SharedHealth
from keel.gateway.limits import MemoryRateLimiter, RedisBudgetLedger, RedisRateLimiter
from keel.gateway.messages import messages_endpoint
from keel.gateway.routing import ModelTable
from keel.gateway.stats import GatewayStats
from keel.plugins import provider_factories
from keel.prompts import PromptCache
from keel.providers.local import local_available
from keel.providers.local_embeddings import local_embeddings_available
from keel.server.api import build_api_router, principal_from_request
from keel.server.masterkey import resolve_master_key
from keel.store import Store, utcnow
from keel.store.prompts import PromptStore
from keel.store.rollups import prune_minute_rows
from keel.store.scores import sweep_retention
from keel.tracing import TraceWriter

__all__ = ["KeelApp", "KeelState", "create_app", "effective_models"]

log = logging.getLogger("keel.server")


def effective_models(settings: Settings) -> tuple[ModelConfig, ...]:
    """Configured models; with none configured, the bundled local model when it is installed."""
    if settings.models:
        return settings.models
    found: list[ModelConfig] = []
    if local_available():
        found.append(ModelConfig(name="local", provider="local", model="SmolLM2-135M-Instruct"))
    if local_embeddings_available():
        found.append(ModelConfig(name="all-minilm-l6-v2", provider="local", model="all-MiniLM-L6-v2"))
    return tuple(found)


@dataclass
class KeelState:
    settings: Settings
    store: Store
    keys: KeyCache
    models: ModelTable
    writer: TraceWriter
    gateway: Gateway
    stats: GatewayStats
    master_key: str


class _Collector:
    def __init__(self, stats: GatewayStats) -> None:
        self.stats = stats

    def collect(self) -> Any:
        return self.stats.collect()


class KeelApp:
    """keel's ASGI application: hot-path routes first, then the FastAPI app."""

    def __init__(self, state: KeelState, api: FastAPI) -> None:
        self.state = state
        self.api = api
        gw = state.gateway
        self._fast = {
            "/v1/chat/completions": gw.chat_completions,
            "/chat/completions": gw.chat_completions,
            "/v1/models": gw.list_models,
            "/v1/embeddings": gw.embeddings,
            "/v1/messages": messages_endpoint(gw),
            "/embeddings": gw.embeddings,
            "/health": self._health,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self._fast.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(send, 200, b'{"status":"ok"}', [])


# Management API areas beyond keys/projects/teams/usage/traces (keel/server/api.py).
API_MODULES: tuple[str, ...] = (
    "keel.server.api_scores",
    "keel.server.api_export",
    "keel.server.api_retention",
    "keel.server.otlp",
    "keel.server.api_prompts",
    "keel.server.api_metrics",
    "keel.server.api_audit",
    "keel.server.api_sessions",
    "keel.server.api_evals",
    "keel.server.api_review",
    "keel.server.api_users",
)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    factories: dict[str, Any] | None = None,
    tune_gc: bool = False,
) -> KeelApp:
    """Build the app. Collaborators (store, provider factories) may be injected, e.g. by tests."""
    store = store or Store.from_url(database_url(settings))
    master_key, _ = resolve_master_key(settings)
    factories = factories if factories is not None else provider_factories()
    models = ModelTable.build(settings, factories, effective_models(settings))
    keys = KeyCache(
        store,
        master_key,
        redis_url=settings.redis_url,
        refresh_s=settings.key_refresh_s,
        redis_prefix=settings.redis_prefix,
    )
    stats = GatewayStats()

    def count_cost(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            if r["kind"] == "llm" and r["cost_usd"]:
                stats.cost[(r["requested_model"] or "-", r["attributes"].get("keel.deployment", "-"))] += r[
                    "cost_usd"
                ]

    writer = TraceWriter(
        store,
        max_queue=settings.trace_queue_size,
        batch_size=settings.trace_batch_size,
        flush_interval_s=settings.trace_flush_interval_s,
        store_bodies=settings.store_bodies,
        redact_pii=settings.trace_redact_pii,
        on_batch=count_cost,
        process_url=database_url(settings) if settings.trace_writer == "process" else None,
    )
    stats.gauges["keel_trace_queue_depth"] = ("Trace records waiting to be written", lambda: writer.depth)
    stats.counters["keel_trace_dropped"] = (
        "Trace records dropped because the queue was full",
        lambda: writer.stats.dropped,
    )
    stats.counters["keel_trace_written"] = ("Spans written to the trace store", lambda: writer.stats.written)
    stats.counters["keel_trace_write_failed"] = (
        "Spans lost to repeated database failures",
        lambda: writer.stats.failed,
    )
    stats.counters["keel_unpriced_spans"] = (
        "LLM spans whose cost could not be priced",
        lambda: writer.stats.unpriced,
    )
    health = HealthBoard(settings.routing.cooldown)
    stats.health = health
    shared = (
        SharedHealth(health, settings.redis_url, prefix=settings.redis_prefix) if settings.redis_url else None
    )
    gateway = Gateway(settings, keys, models, writer, stats, health)
    prompts = PromptCache(
        PromptStore(store.engine), settings.redis_url, settings.key_refresh_s, settings.redis_prefix
    )
    gateway.prompts = prompts
    if settings.cache.enabled:
        gateway.cache = _build_cache(settings)
    gateway.limiter = MemoryRateLimiter(window_s=settings.rate_limit_window_s)
    if settings.redis_url:
        prefix = settings.redis_prefix
        gateway.limiter = RedisRateLimiter(
            settings.redis_url, prefix=f"{prefix}rl:", window_s=settings.rate_limit_window_s
        )
        gateway.ledger = RedisBudgetLedger(settings.redis_url, prefix=f"{prefix}budget:")
    if settings.alert_webhook_url:
        gateway.on_alert = _webhook(settings.alert_webhook_url)
    state = KeelState(settings, store, keys, models, writer, gateway, stats, master_key)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_log_scrubbing()
        await asyncio.get_running_loop().run_in_executor(None, _audit_config, store, settings)
        await keys.start()
        await prompts.start()
        if shared is not None:
            await shared.start()
        writer.start()
        if tune_gc:
            _tune_gc()
        # always on: projects may set their own retention even when the global one is off
        retention = asyncio.get_running_loop().create_task(_retention(state))
        online = _start_online_eval(state, api)
        try:
            yield
        finally:
            retention.cancel()
            if online is not None:
                online[0].cancel()
                await online[1].aclose()
            await writer.stop()
            if shared is not None:
                await shared.stop()
            await keys.stop()
            await prompts.stop()
            await models.aclose()

    api = FastAPI(
        title="keel",
        version=keel.__version__,
        description="keel's gateway and management API. Authenticate with `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; keel serves nothing from the network
        redoc_url=None,
        openapi_url=None,  # served below, behind auth like every route but /health
    )
    api.state.keel = state
    # further /api areas, each a module exposing build_router() -> APIRouter; included first so their
    # literal paths (/api/traces/export) win over the core router's /api/traces/{trace_id}
    for name in API_MODULES:
        api.include_router(importlib.import_module(name).build_router())
    api.include_router(build_api_router())
    _document_gateway(api)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = (
            exc.detail
            if isinstance(exc.detail, dict)
            else {"message": str(exc.detail), "type": "invalid_request_error", "code": _code(exc.status_code)}
        )
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else str(first.get("msg", "invalid request"))
        )
        return JSONResponse(
            {"error": {"message": msg, "type": "invalid_request_error", "code": "invalid_request"}},
            status_code=400,
        )

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request) -> Response:
        principal_from_request(request)
        return JSONResponse(api.openapi())

    @api.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        principal_from_request(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    from keel.ui import mount_ui

    mount_ui(api)
    keel_app = KeelApp(state, api)
    api.state.keel_app = keel_app  # the online evaluator calls judges through it, in-process
    return keel_app


def _start_online_eval(state: KeelState, api: FastAPI) -> tuple[asyncio.Task[None], Any] | None:
    """Online evaluation in the background of this process (off the request path); None when off."""
    if state.settings.online_eval_interval_s <= 0:
        return None
    import httpx

    from keel.evals.online import OnlineEvaluator

    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.state.keel_app),
        base_url="http://keel",
        headers={"authorization": f"Bearer {state.master_key}"},
        timeout=state.settings.upstream_timeout_s,
    )
    ev = OnlineEvaluator(
        state.store,
        http,
        interval_s=state.settings.online_eval_interval_s,
        batch_size=state.settings.online_eval_batch_size,
        concurrency=state.settings.online_eval_concurrency,
    )
    api.state.online_eval = ev
    state.stats.counters["keel_online_eval_scores"] = (
        "Scores written by online evaluation rules",
        lambda: ev.stats.scores_written,
    )
    state.stats.counters["keel_online_eval_errors"] = (
        "Online evaluation outcomes without a value (judge_error, ...)",
        lambda: ev.stats.errors,
    )
    return asyncio.get_running_loop().create_task(ev.run()), http


def _build_cache(settings: Settings) -> ResponseCache:
    """Exact (and optionally semantic) response cache: in-process, or shared through Redis."""
    exact: ExactCache
    index: SemanticIndex
    if settings.redis_url:
        exact = RedisExactCache(settings.redis_url, prefix=f"{settings.redis_prefix}cache:")
        index = RedisSemanticIndex(settings.redis_url, prefix=f"{settings.redis_prefix}semcache:")
    else:
        exact, index = MemoryExactCache(), MemorySemanticIndex()
    return ResponseCache(exact, SemanticCache(index) if settings.cache.semantic else None)


def _webhook(url: str) -> Any:
    """An alert sink that POSTs JSON to ``url`` (failures are logged, never raised into a request)."""
    import aiohttp

    async def post(budget: Any, status: dict[str, Any]) -> None:
        payload = {
            "type": "budget.soft_limit_crossed",
            "scope": budget.scope,
            "period": budget.period,
            "status": status,
        }
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                async with s.post(
                    url, data=orjson.dumps(payload), headers={"content-type": "application/json"}
                ) as r:
                    if r.status >= 300:
                        log.warning("alert webhook %s answered %s", url, r.status)
        except Exception as exc:
            log.warning("alert webhook %s failed: %s", url, exc)

    return post


def config_sections(settings: Settings) -> dict[str, Any]:
    """The effective configuration, section by section, with provider keys as fingerprints only."""
    import hashlib

    def model(m: Any) -> dict[str, Any]:
        d = m.model_dump(mode="json", exclude={"api_key"})
        if m.api_key:
            d["api_key_fingerprint"] = hashlib.sha256(m.api_key.encode()).hexdigest()[:12]
        return dict(d)

    return {
        "models": [model(m) for m in settings.models],
        "routing": settings.routing.model_dump(mode="json"),
        "cache": settings.cache.model_dump(mode="json"),
        "guardrails": settings.guardrails.model_dump(mode="json"),
    }


def _audit_config(store: Store, settings: Settings) -> None:
    """Record a configuration change (models, routing, cache, guardrail policy) in the audit log."""
    from keel.store import audit

    try:
        audit.record_config(store, config_sections(settings))
    except Exception:  # the audit must not keep the server from starting; it is logged loudly
        log.exception("could not record the configuration in the audit log")


def install_log_scrubbing() -> None:
    """Scrub credentials from every log line keel's process writes (keel's and the server's loggers)."""
    from keel.errors import SecretScrubFilter

    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "keel"):
        lg = logging.getLogger(name)
        for target in (lg, *lg.handlers):
            if not any(isinstance(f, SecretScrubFilter) for f in target.filters):
                target.addFilter(SecretScrubFilter())


def _tune_gc() -> None:
    """Keep full collections off the hot path.

    After start-up a worker holds a few hundred thousand long-lived objects (FastAPI, pydantic,
    SQLAlchemy, the price catalog); left in the collected generations, every full collection walks
    them all and stalls the event loop for 100+ ms. Freezing them and collecting the young
    generation less often keeps P99 close to P50.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def _code(status: int) -> str:
    return {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
        status, "error"
    )


def database_url(settings: Settings) -> str:
    """The database URL; the default SQLite file follows `data_dir` when only that was changed."""
    default = next(s.default for s in SETTINGS if s.name == "database_url")
    if settings.database_url == default and settings.data_dir != ".keel":
        return f"sqlite:///{settings.data_dir}/keel.db"
    return settings.database_url


async def _retention(state: KeelState) -> None:
    """Delete old traces in batches: per-project retention_days, else the global setting."""
    while True:
        try:
            deleted = await asyncio.to_thread(sweep_retention, state.store, state.settings.retention_days)
            for pid, n in deleted.items():
                log.info("retention: deleted %d traces of %s", n, pid or "projects on the global setting")
            if state.settings.rollup_minute_days > 0:
                cut = utcnow() - timedelta(days=state.settings.rollup_minute_days)
                await asyncio.to_thread(prune_minute_rows, state.store.engine, cut)
        except Exception:
            log.exception("retention sweep failed")
        await asyncio.sleep(state.settings.retention_interval_s)


class ChatCompletionRequest(BaseModel):
    """OpenAI chat-completions request (every other OpenAI parameter is passed through)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False


def _document_gateway(api: FastAPI) -> None:
    """Describe the raw-ASGI gateway routes in /openapi.json (they are served before FastAPI)."""

    @api.post(
        "/v1/chat/completions",
        tags=["gateway"],
        summary="OpenAI-compatible chat completions (SSE when stream=true)",
    )
    def _chat(body: ChatCompletionRequest) -> dict[str, Any]:  # pragma: no cover - served by the gateway
        raise HTTPException(500)

    @api.get("/v1/models", tags=["gateway"], summary="OpenAI-compatible model list")
    def _models() -> dict[str, Any]:  # pragma: no cover - served by the gateway
        raise HTTPException(500)

    @api.get("/health", tags=["gateway"], summary="Liveness")
    def _health() -> dict[str, Any]:  # pragma: no cover - served before FastAPI
        return orjson.loads(b'{"status":"ok"}')  # type: ignore[no-any-return]
