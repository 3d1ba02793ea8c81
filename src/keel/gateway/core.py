"""The gateway's hot path, as raw ASGI handlers: auth → validate → route → provider → trace.

Nothing here touches the database: keys come from :class:`KeyCache`, models from
:class:`ModelTable`, and the finished span goes to the :class:`TraceWriter` queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from typing import Any, Protocol

import orjson

from keel.config import RetryConfig, RouteRule, Settings
from keel.errors import (
    BadRequest,
    Forbidden,
    KeelError,
    NotFound,
    RateLimited,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from keel.gateway.asgi import ClientGone, Receive, Scope, Send, read_body, send_bytes, send_error
from keel.gateway.auth import KeyCache, bearer_token
from keel.gateway.cache import (
    CachedResponse,
    CacheHit,
    ResponseCache,
    cacheable,
    storable,
    stream_from_cached,
)
from keel.gateway.health import HealthBoard
from keel.gateway.limits import (
    Budget,
    BudgetLedger,
    Limit,
    MemoryBudgetLedger,
    MemoryRateLimiter,
    RateLimiter,
)
from keel.gateway.prompting import apply_prompt
from keel.gateway.rails import build_rails
from keel.gateway.routing import Deployment, ModelTable, Router, RuleInput, match_rule
from keel.gateway.stats import GatewayStats
from keel.pricing import price
from keel.prompts import PromptCache
from keel.providers.openai import usage_from_openai
from keel.tracing import TraceWriter, new_span_id, new_trace_id, parse_traceparent
from keel.types import ChatResult, Principal, SpanRecord, Usage

__all__ = ["Gateway", "OpenAIResponder", "Responder"]

log = logging.getLogger("keel.gateway")

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_ROUTE_CHAT = "/v1/chat/completions"
_ROUTE_EMBED = "/v1/embeddings"


class _Req:
    """What the hot path learns about one request, turned into a span at the end."""

    __slots__ = (
        "auth",
        "body",
        "content_length",
        "guard",
        "headers",
        "metadata",
        "parent",
        "principal",
        "prompt",
        "run_id",
        "session",
        "span_id",
        "start",
        "start_pc",
        "tags",
        "trace_id",
        "user",
        "x_api_key",
    )

    def __init__(self, scope: Scope) -> None:
        self.headers = scope["headers"]
        self.start = time.time()
        self.start_pc = time.perf_counter()
        self.auth: str | None = None
        self.x_api_key: str | None = None
        self.content_length: bytes | None = None
        tp: str | None = None
        tags: str | None = None
        meta: str | None = None
        session: str | None = None
        self.run_id: str | None = None
        self.user: str | None = None  # x-keel-user: the end user when the body names none
        for k, v in scope["headers"]:
            if k == b"authorization":
                self.auth = v.decode("latin-1")
            elif k == b"content-length":
                self.content_length = v
            elif k == b"traceparent":
                tp = v.decode("latin-1")
            elif k == b"x-api-key":
                self.x_api_key = v.decode("latin-1")
            elif k == b"x-keel-tags":
                tags = v.decode("utf-8", "replace")
            elif k == b"x-keel-metadata":
                meta = v.decode("utf-8", "replace")
            elif k == b"x-keel-session-id":
                session = v.decode("utf-8", "replace")
            elif k == b"x-keel-run-id":
                self.run_id = v.decode("utf-8", "replace")[:200]
            elif k == b"x-keel-user":
                self.user = v.decode("utf-8", "replace")[:256]
        ctx = parse_traceparent(tp)
        self.trace_id: str
        self.parent: str | None
        if ctx:
            self.trace_id, self.parent = ctx
        else:
            self.trace_id, self.parent = new_trace_id(), None
        self.span_id = new_span_id()
        self.tags = [t.strip() for t in tags.split(",") if t.strip()][:50] if tags else []
        self.metadata: Any = meta
        self.session = session
        self.principal: Principal | None = None
        self.body: dict[str, Any] | None = None
        self.prompt: tuple[str, int, str] | None = None  # registry prompt rendered: (name, version, label)
        self.guard: Any = None  # the request's guardrails (keel.gateway.rails), when any apply


class Gateway:
    """OpenAI-compatible gateway endpoints over a model table, a key cache and a trace writer."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyCache,
        models: ModelTable,
        writer: TraceWriter,
        stats: GatewayStats | None = None,
        health: HealthBoard | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.models = models
        self.writer = writer
        self.stats = stats or GatewayStats()
        self.health = health or HealthBoard(settings.routing.cooldown)
        self.router = Router(models, settings.routing, self.health)
        self.limit = settings.max_request_bytes
        self.cache: ResponseCache | None = None  # set by the app when caching is configured
        self.limiter: RateLimiter = MemoryRateLimiter()  # the app swaps in Redis-backed ones when configured
        self.ledger: BudgetLedger = MemoryBudgetLedger()
        self.on_alert: Any = None  # called with (budget, status) when a soft budget limit is crossed
        self._background: set[asyncio.Task[Any]] = set()
        self.prompts: PromptCache | None = None  # set by the app: requests may name registry prompts
        # estimating prompt tokens costs time: only when a deployment declares a context window
        self._needs_estimate = any(d.config.max_input_tokens for d in models.all())
        self._budget_read: dict[tuple[str, str], float] = {}
        self.rails = build_rails(settings, self)  # None when no guardrails are configured

    # -- shared steps -----------------------------------------------------------------------------

    def _span(
        self, req: _Req, name: str, status_code: int, error: KeelError | None = None, kind: str = "llm"
    ) -> SpanRecord:
        body = req.body or {}
        p = req.principal
        meta: dict[str, Any] = {}
        if req.metadata:
            try:
                parsed = orjson.loads(req.metadata)
                meta = parsed if isinstance(parsed, dict) else {"value": parsed}
            except orjson.JSONDecodeError:
                meta = {"raw": req.metadata}
        user = body.get("user")
        return SpanRecord(
            trace_id=req.trace_id,
            span_id=req.span_id,
            parent_span_id=req.parent,
            name=name,
            kind=kind,
            start_time=req.start,
            end_time=time.time(),
            status="error" if error else "ok",
            status_code=status_code,
            error=f"{error.code}: {error.message}" if error else None,
            project_id=p.project_id if p else None,
            key_id=p.key_id if p else None,
            team_id=p.team_id if p else None,
            requested_model=body.get("model") if isinstance(body.get("model"), str) else None,
            user=user if isinstance(user, str) else (req.user or (p.end_user if p else None)),
            session_id=req.session,
            prompt_name=req.prompt[0] if req.prompt else None,
            prompt_version=req.prompt[1] if req.prompt else None,
            tags=req.tags,
            metadata=meta,
            input=req.body,
            stream=bool(body.get("stream")),
        )

    def _finish(self, req: _Req, rec: SpanRecord, route: str, run: _Run | None = None) -> None:
        elapsed = time.perf_counter() - req.start_pc
        model = rec.requested_model or "-"
        st = self.stats
        st.requests[(route, model, str(rec.status_code))] += 1
        if run is not None and run.served is not None:
            st.by_deployment[(run.served.label, str(rec.status_code))] += 1
        if run is not None and (len(run.attempts) > 1 or run.skipped):
            for child in run.child_spans(rec):
                self.writer.submit(child)
        st.latency[route].observe(elapsed)
        if rec.status == "error" and rec.error:
            st.errors[(route, rec.error.split(":", 1)[0])] += 1
        if rec.usage.input_tokens:
            st.tokens[(model, "input")] += rec.usage.input_tokens
        if rec.usage.output_tokens:
            st.tokens[(model, "output")] += rec.usage.output_tokens
        if req.guard is not None:
            for span in req.guard.finish(rec):
                self.writer.submit(span)
        self.writer.submit(rec)

    async def _fail(
        self, req: _Req, send: Send, err: KeelError, route: str, name: str, dialect: str = "openai"
    ) -> None:
        rec = self._span(req, name, err.status, err)
        self._finish(req, rec, route)
        try:
            await send_error(send, err, [(b"x-keel-trace-id", req.trace_id.encode())], dialect)
        except OSError:
            pass

    def authenticate(self, req: _Req) -> Principal:
        key = bearer_token(req.auth, req.x_api_key)
        if key is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>", code="missing_api_key")
        p = self.keys.lookup_any(key)
        if p is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        if p.is_public:
            raise Forbidden("a public key (pk-keel-) may only post end-user feedback", code="public_key")
        if "gateway" not in p.scopes:
            raise Forbidden("this key lacks the 'gateway' scope", code="scope_required")
        return p

    def parse_chat(self, raw: bytes, req: _Req | None = None) -> dict[str, Any]:
        body = _parse_object(raw)
        if self.prompts is not None and req is not None:  # "model": "prompt:NAME" or x-keel-prompt
            if (named := apply_prompt(self.prompts, body, req.headers, req.principal)) is not None:
                body, req.prompt = named
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", code="missing_model", param="model")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest(
                "'messages' must be a non-empty array", code="invalid_messages", param="messages"
            )
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise BadRequest(
                    f"messages[{i}] must be an object", code="invalid_messages", param=f"messages[{i}]"
                )
            if m.get("role") not in _ROLES:
                raise BadRequest(
                    f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}",
                    code="invalid_messages",
                    param=f"messages[{i}].role",
                )
        if "stream" in body and not isinstance(body["stream"], bool):
            raise BadRequest("'stream' must be a boolean", code="invalid_request", param="stream")
        for k in ("max_tokens", "max_completion_tokens", "n"):
            v = body.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise BadRequest(f"'{k}' must be a positive integer", code="invalid_request", param=k)
        return body

    # -- routes -----------------------------------------------------------------------------------

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/chat/completions."""
        req = _Req(scope)
        out = OpenAIResponder(send, req.trace_id)
        if scope["method"] != "POST":
            err = KeelError("use POST", status=405, code="method_not_allowed")
            await self._fail(req, send, err, _ROUTE_CHAT, "chat.completions")
            return
        try:
            req.principal = self.authenticate(req)
            raw = await read_body(scope, receive, self.limit, req.content_length)
            body = req.body = self.parse_chat(raw, req)
        except ClientGone:
            return
        except KeelError as err:
            await self._fail(req, send, err, _ROUTE_CHAT, "chat.completions")
            return
        await self.serve_chat(req, body, out, _ROUTE_CHAT, "chat.completions")

    async def serve_chat(
        self, req: _Req, body: dict[str, Any], out: Responder, route: str, name: str
    ) -> None:
        """Route a validated OpenAI-shaped chat request through deployments, retries and fallbacks."""
        assert req.principal is not None
        model = body["model"]
        run = _Run(req)
        rules = self.router.routing.rules
        if rules:
            run.rule = match_rule(rules, self._rule_input(req, body, model))
        asked = self.router.resolve(model)  # the name asked for, after aliases: what permissions apply to
        target = run.target = self.router.resolve(run.rule.route_to) if run.rule else asked
        try:
            if asked is None or target is None:
                raise NotFound(
                    f"model '{model}' does not exist or is not served here",
                    code="model_not_found",
                    param="model",
                )
            if not (req.principal.may_use(model) or (asked is not None and req.principal.may_use(asked))):
                raise Forbidden(f"this key is not allowed to use model '{model}'", code="model_not_allowed")
            if self.rails is not None:  # input rails: before the cache and the provider see the request
                body, out = await self.rails.begin(req, body, out, target, run)
            await self._admit(req, body, run)
            if self.cache is not None and self._caches(target):
                ok, why = cacheable(body, req.headers, cache_tool_calls=self.settings.cache.cache_tool_calls)
                if ok:
                    cfg = self.settings.cache
                    scope = req.principal.project_id or "_master"
                    thr = cfg.thresholds.get(target, cfg.semantic_threshold) if cfg.semantic else None
                    hit = await self.cache.lookup(body, scope, semantic_threshold=thr)
                    if hit is not None:
                        self._settle(run, None)  # nothing was spent: release the reservation
                        await self._serve_cached(req, body, hit, out, route, name)
                        return
                    run.cache_scope = scope
                else:
                    run.cache_bypass = why
                out.add_header(b"x-keel-cache", b"miss")
            if body.get("stream"):
                await self._run_stream(req, body, target, run, out, route, name)
            else:
                result = await self._attempt_all(body, target, run, stream=False)
                assert isinstance(result, ChatResult)
                if run.cache_scope is not None:
                    self._cache_store(body, run, result.body, result.usage)
                try:
                    await out.complete(result)
                finally:
                    rec = self._span(req, name, 200)
                    run.describe(rec)
                    rec.model = result.served_model or (
                        run.served.config.upstream_model if run.served else None
                    )
                    rec.usage = result.usage
                    self._settle(run, result.usage)
                    rec.output = result.body
                    self.stats.overhead[route].observe(
                        max(0.0, time.perf_counter() - req.start_pc - run.upstream_s)
                    )
                    self._finish(req, rec, route, run)
        except Exception as exc:
            # a provider bug must still answer in the API's shape and leave a trace, never a bare 500
            if isinstance(exc, KeelError):
                err = exc
            else:
                log.exception("request failed inside keel")
                err = KeelError(f"internal error ({type(exc).__name__})", status=500, code="internal_error")
            self._settle(run, None)
            rec = self._span(req, name, err.status, err)
            run.describe(rec)
            self._finish(req, rec, route, run)
            try:
                await out.error(err)
            except OSError:
                pass

    async def _take_deployment(self, dep: Deployment, body: dict[str, Any], run: _Run) -> bool:
        """Count one request (and its token estimate) against the deployment's own RPM/TPM."""
        assert dep.limit is not None
        est = 0
        if dep.limit.tpm:
            est = _prompt_estimate(body) + int(
                body.get("max_completion_tokens") or body.get("max_tokens") or 0
            )
        decision = await self.limiter.check([dep.limit], est)
        if decision.allowed:
            run.dep_limits.append((dep, dep.limit, est, decision.at))
            return True
        self.stats.limit_rejections[("deployment", decision.kind or "rpm")] += 1
        run.skipped.append((dep, f"at its {decision.kind} limit"))
        wait = decision.retry_after_s
        run.limited_until = wait if run.limited_until is None else min(run.limited_until, wait)
        return False

    async def _attempt_all(
        self, body: dict[str, Any], target: str, run: _Run, *, stream: bool, call: Any = None
    ) -> Any:
        """Try deployments of ``target``, retrying and falling back; return what the winning call returned.

        ``call(deployment, headers)`` does one attempt; by default a chat completion (or, with
        ``stream``, an opened stream and its first chunk).
        """
        routing = self.router.routing
        queue: list[tuple[str, str]] = [(target, "primary")]
        seen: set[str] = set()
        last: KeelError | None = None
        prompt_tokens = _prompt_estimate(body) if self._needs_estimate else None
        while queue:
            name, why = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            plan = self.router.plan(name, prompt_tokens)
            run.skipped += plan.skipped
            if why != "primary":
                self.stats.fallbacks[(target, name, why)] += 1
            escalate: str | None = None
            if not plan.candidates and any("context window" in reason for _, reason in plan.skipped):
                escalate = "context_window_fallbacks"
            for di, dep in enumerate(plan.candidates):
                more_after = (
                    di < len(plan.candidates) - 1 or bool(queue) or bool(self.router.fallbacks(target))
                )
                if dep.limit is not None and not await self._take_deployment(dep, body, run):
                    continue  # at its own RPM/TPM: the next deployment or a fallback serves
                attempt = 0
                while True:
                    attempt += 1
                    t0 = time.perf_counter()
                    self.health.begin(dep.key, time.monotonic())
                    headers = {"traceparent": f"00-{run.req.trace_id}-{run.req.span_id}-01"}
                    try:
                        if call is not None:
                            result: Any = await call(dep, headers)
                        elif stream:
                            opened = await dep.provider.chat_stream(body, headers)
                            it, first = await _first_chunk(opened, dep.config.stream_timeout_s, dep.label)
                            result = (opened, it, first)
                        else:
                            result = await dep.provider.chat(body, headers)
                    except KeelError as err:
                        elapsed = time.perf_counter() - t0
                        run.upstream_s += elapsed
                        run.attempt(dep, attempt, name, t0, err)
                        last = err
                        kind = _classify(err)
                        if kind == "client":
                            self.health.release(dep.key)
                            raise
                        if kind in ("context", "policy"):
                            self.health.release(dep.key)
                            escalate = (
                                "context_window_fallbacks"
                                if kind == "context"
                                else "content_policy_fallbacks"
                            )
                            break
                        retry_after = _retry_after(err)
                        cooled = self.health.failure(
                            dep.key,
                            err.code,
                            time.monotonic(),
                            rate_limited=err.status == 429,
                            retry_after=retry_after,
                        )
                        if cooled:
                            self.stats.cooldowns[dep.key] += 1
                        if kind == "no-retry" or attempt > dep.config.max_retries:
                            break
                        if err.status == 429 and more_after:
                            break  # rate limited here: another deployment or a fallback answers sooner
                        if retry_after is not None and retry_after > routing.retry.max_retry_after_s:
                            break
                        self.stats.retries[dep.label] += 1
                        await asyncio.sleep(_backoff(attempt, routing.retry, retry_after))
                        continue
                    elapsed = time.perf_counter() - t0
                    run.upstream_s += elapsed
                    self.health.success(dep.key, elapsed)
                    run.attempt(dep, attempt, name, t0, None)
                    run.served, run.served_name = dep, name
                    return result
                if escalate:
                    break
            if escalate:
                nxt = self.router.fallbacks(target, escalate) or self.router.fallbacks(name, escalate)
                if not nxt and last is not None:
                    raise last
                if not nxt and escalate == "context_window_fallbacks":
                    raise BadRequest(
                        f"the prompt (~{prompt_tokens} tokens) exceeds the context window of every deployment "
                        f"of '{name}' and no context-window fallback is configured",
                        code="context_length_exceeded",
                    )
                queue = [(n, escalate) for n in nxt] + queue
                continue
            if why == "primary":
                queue += [(n, "fallbacks") for n in self.router.fallbacks(target)]
        if last is not None:
            raise last
        if run.limited_until is not None and all(
            why.startswith("at its ") for _, why in run.skipped
        ):  # every deployment is at its own rate limit: the client should retry later, like any 429
            after = max(1, math.ceil(run.limited_until))
            raise RateLimited(
                f"every deployment of '{target}' is at its rate limit: "
                + "; ".join(f"{d.label} {why}" for d, why in run.skipped)
                + f". Retry after {after}s.",
                code="rate_limit_exceeded:deployment",
                headers={"retry-after": str(after)},
            )
        waits = [self.health.get(d.key).cooldown_until - time.monotonic() for d, _ in run.skipped]
        retry = max(1, int(min(waits))) if waits else 1
        raise UpstreamUnavailable(
            f"no deployment of '{target}' can take requests now: "
            + "; ".join(f"{d.label} {reason}" for d, reason in run.skipped),
            code="no_deployment_available",
            headers={"retry-after": str(retry)},
        )

    async def _run_stream(
        self, req: _Req, body: dict[str, Any], target: str, run: _Run, out: Responder, route: str, name: str
    ) -> None:
        opened, it, first = await self._attempt_all(body, target, run, stream=True)
        dep = run.served
        assert dep is not None
        first_at = time.perf_counter()
        await out.stream_start()
        error: KeelError | None = None
        client_gone = False
        try:
            await out.stream_chunk(first)
            idle = dep.config.stream_timeout_s
            while True:
                try:
                    chunk = await (asyncio.wait_for(it.__anext__(), idle) if idle else it.__anext__())
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"upstream {dep.label} went silent for {idle}s mid-stream"
                    ) from None
                await out.stream_chunk(chunk)
        except KeelError as err:
            error = err
        except OSError:
            client_gone = True
        except Exception as exc:  # never let a provider bug turn into a hung stream
            log.exception("stream failed")
            error = UpstreamError(f"stream failed: {type(exc).__name__}")
        if error is not None and not client_gone:
            try:
                await out.stream_error(error)
            except OSError:
                client_gone = True
        if not client_gone:
            try:
                await out.stream_end()
            except OSError:
                client_gone = True
        if client_gone:
            with contextlib.suppress(Exception):
                await it.aclose()
        status = 200 if error is None and not client_gone else (error.status if error else 499)
        rec = self._span(req, name, status, error)
        if client_gone and error is None:
            rec.status, rec.error = "error", "client_disconnected: the client closed the stream"
        run.describe(rec)
        rec.model = opened.served_model or dep.config.upstream_model
        usage = opened.usage
        if usage.input_tokens is None and usage.output_tokens is None:
            usage = _estimate_usage(body, opened.output_text)
        rec.usage = usage
        self._settle(run, usage)
        rec.output = {
            "role": "assistant",
            "content": opened.output_text or None,
            **({"tool_calls": opened.tool_calls} if opened.tool_calls else {}),
            "finish_reason": opened.finish_reason,
        }
        rec.ttft_ms = (first_at - req.start_pc) * 1000.0
        self.stats.ttft[route].observe(first_at - req.start_pc)
        if run.cache_scope is not None and rec.status == "ok":
            completion = {
                "id": f"chatcmpl-{req.trace_id}",
                "object": "chat.completion",
                "created": int(req.start),
                "model": rec.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {k: v for k, v in rec.output.items() if k != "finish_reason"},
                        "finish_reason": opened.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": usage.input_tokens or 0,
                    "completion_tokens": usage.output_tokens or 0,
                    "total_tokens": (usage.input_tokens or 0) + (usage.output_tokens or 0),
                },
            }
            self._cache_store(body, run, completion, usage)
        self._finish(req, rec, route, run)

    async def _admit(self, req: _Req, body: dict[str, Any], run: _Run) -> None:
        """Rate limits and budgets of the key, its team and its project: one atomic step each.

        RPM/TPM are counted before the call (TPM with prompt + max_tokens, corrected afterwards);
        the budget reserves the most the call can cost and settles the actual cost afterwards.
        """
        p = req.principal
        assert p is not None
        scoped = [
            ("key", p.key_id, p.limits),
            ("team", p.team_id, p.team_limits),
            ("project", p.project_id, p.project_limits),
        ]
        user = body.get("user") if isinstance(body.get("user"), str) else (req.user or p.end_user)
        if user and p.project_limits:
            # per end user: the project's user_* limits apply to each end user separately
            per_user = {
                k[5:]: v for k, v in p.project_limits.items() if k.startswith("user_") and v is not None
            }
            if per_user:
                scoped.append(("user", f"{p.project_id}:{user}", per_user))
        limits = [
            Limit(f"{kind}:{ident}", rpm=cfg.get("rpm"), tpm=cfg.get("tpm"))
            for kind, ident, cfg in scoped
            if ident and cfg and (cfg.get("rpm") or cfg.get("tpm"))
        ]
        budgets = [
            Budget(
                f"{kind}:{ident}",
                limit_usd=float(cfg["budget_usd"]),
                period=str(cfg.get("budget_period", "monthly")),
                soft_limit_usd=cfg.get("soft_budget_usd"),
            )
            for kind, ident, cfg in scoped
            if ident and cfg and cfg.get("budget_usd") is not None
        ]
        run_id = req.run_id
        if (
            run_id
            and p.project_limits
            and (p.project_limits.get("run_budget_usd") or p.project_limits.get("run_max_calls"))
        ):
            pl = p.project_limits
            budgets.append(
                Budget(
                    f"run:{p.project_id}:{run_id}",
                    limit_usd=float(pl.get("run_budget_usd") or math.inf),
                    period="total",
                    max_calls=pl.get("run_max_calls"),
                )
            )
        if not limits and not budgets:
            return
        prompt = _prompt_estimate(body)
        max_out = int(body.get("max_completion_tokens") or body.get("max_tokens") or 4096)
        if limits:
            decision = await self.limiter.check(limits, prompt + max_out)
            if not decision.allowed:
                scope_type = decision.limit.scope.split(":", 1)[0] if decision.limit else "-"
                self.stats.limit_rejections[(scope_type, decision.kind or "rpm")] += 1
            decision.raise_if_denied()
            run.limits = (limits, prompt + max_out, decision.at)
        if budgets:
            target = run.target or self.router.resolve(body["model"])
            deps = self.models.by_name.get(target or "", [])
            worst = max(
                (
                    price(
                        d.config.upstream_model,
                        d.config.provider,
                        Usage(input_tokens=prompt, output_tokens=max_out),
                        d.price_override,
                    )
                    or 0.0
                    for d in deps
                ),
                default=0.0,
            )
            reservation = await self.ledger.reserve(budgets, f"{req.trace_id}:{req.span_id}", worst)
            run.budgets = budgets
            if not reservation.ok:
                b = reservation.budget
                self.stats.limit_rejections[
                    (
                        b.scope.split(":", 1)[0] if b else "-",
                        "calls" if reservation.reason == "max_calls" else "budget",
                    )
                ] += 1
                if run.limits:
                    limits_, est, at = run.limits
                    await self.limiter.settle_tokens(limits_, est, 0, admitted_at=at)
                    run.limits = None
                reservation.raise_if_denied()
            run.reservation = f"{req.trace_id}:{req.span_id}"

    def _rule_input(self, req: _Req, body: dict[str, Any], model: str) -> RuleInput:
        meta: dict[str, Any] = {}
        if req.metadata:
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed = orjson.loads(req.metadata)
                meta = parsed if isinstance(parsed, dict) else {}
        return RuleInput(
            model=model,
            tags=req.tags,
            headers=req.headers,
            metadata=meta,
            has_tools=bool(body.get("tools") or body.get("functions")),
            prompt_tokens=lambda: _prompt_estimate(body),
        )

    def _settle(self, run: _Run, usage: Usage | None) -> None:
        """Correct TPM and settle (or release) the budget reservation, in the background."""
        limits, reservation, dep_limits, budgets = run.limits, run.reservation, run.dep_limits, run.budgets
        run.limits = run.reservation = None
        run.dep_limits = []
        if limits is None and reservation is None and not dep_limits:
            return
        dep = run.served
        actual = ((usage.input_tokens or 0) + (usage.output_tokens or 0)) if usage else 0

        async def settle() -> None:
            for d, lim_, est_, at_ in dep_limits:  # a deployment's TPM: tokens it actually served
                await self.limiter.settle_tokens([lim_], est_, actual if d is dep else 0, admitted_at=at_)
            if limits is not None:
                lim, est, at = limits
                await self.limiter.settle_tokens(lim, est, actual, admitted_at=at)
            if reservation is not None:
                if usage is None or dep is None:
                    await self.ledger.release(reservation)
                    return
                cost = price(dep.config.upstream_model, dep.config.provider, usage, dep.price_override) or 0.0
                result = await self.ledger.settle(reservation, cost)
                await self._refresh_budget_gauges(budgets)
                for budget in result.soft_limits_crossed:
                    self.stats.budget_alerts[budget.scope] += 1
                    if self.on_alert is not None:
                        await self.on_alert(budget, await self.ledger.status(budget))

        task = asyncio.get_running_loop().create_task(settle())
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def _refresh_budget_gauges(self, budgets: list[Budget]) -> None:
        """Budget spent/remaining for /metrics, read back at most once a second per budget."""
        now = time.monotonic()
        for b in budgets:
            key = (b.scope, b.period)
            if now - self._budget_read.get(key, -math.inf) < 1.0:
                continue
            self._budget_read[key] = now
            st = await self.ledger.status(b)
            self.stats.budgets[key] = (
                b.limit_usd,
                float(st.get("spent") or 0.0),
                float(st.get("reserved") or 0.0),
            )
            if len(self._budget_read) > 10_000:  # end users and runs come and go
                self._budget_read.clear()
                self.stats.budgets.clear()

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background settlement failed: %r", task.exception())

    def _caches(self, target: str) -> bool:
        models = self.settings.cache.models
        return models is None or target in models

    def _cache_store(self, body: dict[str, Any], run: _Run, completion: dict[str, Any], usage: Usage) -> None:
        """Store a fresh answer in the background (embedding a paraphrase key must not delay the reply)."""
        assert self.cache is not None and run.cache_scope is not None
        ok, _ = storable(completion)
        if not ok:
            return
        dep = run.served
        cost = (
            price(dep.config.upstream_model, dep.config.provider, usage, dep.price_override) if dep else None
        )
        value = CachedResponse.from_completion(completion, cost_usd=cost)
        task = asyncio.get_running_loop().create_task(
            self.cache.store(
                body, run.cache_scope, value, self.settings.cache.ttl_s, semantic=self.settings.cache.semantic
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _serve_cached(
        self, req: _Req, body: dict[str, Any], hit: CacheHit, out: Responder, route: str, name: str
    ) -> None:
        """Answer from the cache: no upstream call, no cost; the saving is recorded on the trace."""
        resp = hit.response
        out.add_header(b"x-keel-cache", b"hit")
        usage = usage_from_openai(resp.usage)
        error: KeelError | None = None
        try:
            if body.get("stream"):
                wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                await out.stream_start()
                for chunk in stream_from_cached(resp, include_usage=wants_usage):
                    await out.stream_chunk(chunk)
                await out.stream_end()
            else:
                await out.complete(ChatResult(body=resp.body, usage=usage, served_model=resp.model))
        except OSError:
            error = KeelError("the client closed the connection", status=499, code="client_disconnected")
        rec = self._span(req, name, 200 if error is None else 499, error)
        rec.model = resp.model
        rec.provider = "cache"
        rec.usage = usage
        rec.cost_usd = 0.0
        rec.output = resp.body
        rec.attributes["keel.cache"] = hit.kind
        rec.attributes["keel.cost_saved_usd"] = resp.cost_usd
        if hit.kind == "semantic":
            rec.attributes["keel.cache_similarity"] = round(hit.similarity, 4)
        self.stats.cache_hits[hit.kind] += 1
        self._finish(req, rec, route)

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/embeddings (OpenAI-compatible upstreams and the local MiniLM model)."""
        req = _Req(scope)
        route, name = _ROUTE_EMBED, "embeddings"
        out = OpenAIResponder(send, req.trace_id)
        run = _Run(req)
        t_start = time.perf_counter()
        try:
            if scope["method"] != "POST":
                raise KeelError("use POST", status=405, code="method_not_allowed")
            req.principal = self.authenticate(req)
            raw = await read_body(scope, receive, self.limit, req.content_length)
            body = req.body = _parse_object(raw)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequest(
                    "'model' is required and must be a string", code="missing_model", param="model"
                )
            inp = body.get("input")
            if inp is None or inp == "" or inp == []:
                raise BadRequest(
                    "'input' must be a non-empty string or array", code="invalid_input", param="input"
                )
            target = self.router.resolve(model)
            if target is None:
                raise NotFound(
                    f"model '{model}' does not exist or is not served here",
                    code="model_not_found",
                    param="model",
                )
            if not (req.principal.may_use(model) or req.principal.may_use(target)):
                raise Forbidden(f"this key is not allowed to use model '{model}'", code="model_not_allowed")

            async def call(dep: Deployment, headers: dict[str, str]) -> dict[str, Any]:
                fn = getattr(dep.provider, "embeddings", None)
                if fn is None:
                    raise BadRequest(
                        f"model '{model}' ({dep.config.provider}) does not serve embeddings",
                        code="unsupported_operation",
                    )
                result: dict[str, Any] = await fn(body, headers)
                return result

            data = await self._attempt_all(body, target, run, stream=False, call=call)
        except ClientGone:
            return
        except KeelError as err:
            rec = self._span(req, name, err.status, err, kind="embedding")
            run.describe(rec)
            self._finish(req, rec, route, run)
            with contextlib.suppress(OSError):
                await out.error(err)
            return
        payload = orjson.dumps(data)
        try:
            await send_bytes(send, 200, payload, [(b"x-keel-trace-id", req.trace_id.encode())])
        finally:
            rec = self._span(req, name, 200, kind="embedding")
            run.describe(rec)
            usage = data.get("usage") or {}
            rec.usage = Usage(
                input_tokens=usage.get("prompt_tokens") or usage.get("total_tokens"), output_tokens=0
            )
            vectors = data.get("data") or []
            first = vectors[0].get("embedding") if vectors and isinstance(vectors[0], dict) else None
            rec.output = {
                "count": len(vectors),
                "dimensions": len(first) if isinstance(first, list) else None,
                "encoding_format": "base64" if isinstance(first, str) else "float",
                "usage": usage,
            }
            self.stats.overhead[route].observe(max(0.0, time.perf_counter() - t_start - run.upstream_s))
            self._finish(req, rec, route, run)

    async def list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/models: the names this key may use."""
        req = _Req(scope)
        hdrs = [(b"x-keel-trace-id", req.trace_id.encode())]
        try:
            p = self.authenticate(req)
        except KeelError as err:
            await send_error(send, err, hdrs)
            return
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": self.models.by_name[n][0].config.provider}
            for n in self.models.names()
            if p.may_use(n)
        ]
        await send_bytes(send, 200, orjson.dumps({"object": "list", "data": data}), hdrs)


def _estimate_usage(body: dict[str, Any], output: str) -> Usage:
    """Count tokens with tiktoken (cl100k, shipped offline) when the upstream reported none."""
    from keel.gateway.tokens import count_messages, count_text

    return Usage(
        input_tokens=count_messages(body.get("messages") or []),
        output_tokens=count_text(output),
        estimated=True,
    )


class Responder(Protocol):
    """Writes the gateway's answer in the dialect the client called (OpenAI here; Anthropic in messages.py)."""

    def add_header(self, name: bytes, value: bytes) -> None: ...
    async def complete(self, result: ChatResult) -> None: ...
    async def error(self, err: KeelError) -> None: ...
    async def stream_start(self) -> None: ...
    async def stream_chunk(self, chunk: bytes) -> None: ...
    async def stream_error(self, err: KeelError) -> None: ...
    async def stream_end(self) -> None: ...


class OpenAIResponder:
    """OpenAI dialect: upstream bytes pass through unchanged."""

    __slots__ = ("_hdrs", "_send")

    def __init__(self, send: Send, trace_id: str) -> None:
        self._send = send
        self._hdrs = [(b"x-keel-trace-id", trace_id.encode())]

    def add_header(self, name: bytes, value: bytes) -> None:
        self._hdrs.append((name, value))

    async def complete(self, result: ChatResult) -> None:
        payload = result.raw if result.raw is not None else orjson.dumps(result.body)
        await send_bytes(self._send, 200, payload, self._hdrs)

    async def error(self, err: KeelError) -> None:
        await send_error(self._send, err, self._hdrs)

    async def stream_start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + self._hdrs})

    async def stream_chunk(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def stream_error(self, err: KeelError) -> None:
        event = (
            b'data: {"error": '
            + orjson.dumps({"message": err.message, "type": err.type, "code": err.code})
            + b"}\n\n"
        )
        await self._send({"type": "http.response.body", "body": event, "more_body": True})

    async def stream_end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class _Run:
    """The attempts of one request: which deployments were tried, skipped, and which one served."""

    __slots__ = (
        "attempts",
        "budgets",
        "cache_bypass",
        "cache_scope",
        "dep_limits",
        "limited_until",
        "limits",
        "req",
        "reservation",
        "rule",
        "served",
        "served_name",
        "skipped",
        "target",
        "upstream_s",
    )

    def __init__(self, req: _Req) -> None:
        self.req = req
        self.attempts: list[tuple[Deployment, int, str, float, float, KeelError | None]] = []
        self.skipped: list[tuple[Deployment, str]] = []
        self.served: Deployment | None = None
        self.served_name: str | None = None
        self.upstream_s = 0.0
        self.cache_scope: str | None = None  # set on a cache miss: store the answer under this scope
        self.limits: tuple[list[Limit], int, float | None] | None = None  # counted limits, tokens, when
        self.reservation: str | None = None  # budget reservation id to settle or release
        self.cache_bypass: str | None = None
        self.budgets: list[Budget] = []
        self.rule: RouteRule | None = None  # the cost-aware routing rule that re-targeted the request
        self.target: str | None = None
        self.dep_limits: list[tuple[Deployment, Limit, int, float | None]] = []  # deployment RPM/TPM taken
        self.limited_until: float | None = None  # soonest a rate-limited deployment frees up (seconds)

    def attempt(self, dep: Deployment, n: int, name: str, t0: float, err: KeelError | None) -> None:
        self.attempts.append((dep, n, name, t0, time.perf_counter(), err))

    def describe(self, rec: SpanRecord) -> None:
        """Put the routing outcome on the request's span."""
        dep = self.served or (self.attempts[-1][0] if self.attempts else None)
        if dep is not None:
            rec.provider = dep.config.provider
            rec.deployment = dep.label
            rec.model = dep.config.upstream_model
            rec.price_override = dep.price_override
        if len(self.attempts) > 1:
            rec.attributes["keel.attempts"] = len(self.attempts)
        if self.rule is not None:
            rec.attributes["keel.route.rule"] = self.rule.name
            rec.attributes["keel.route.to"] = self.rule.route_to
        if self.served_name and rec.requested_model and self.served_name != rec.requested_model:
            rec.attributes["keel.served_by"] = self.served_name
        if self.cache_scope is not None:
            rec.attributes["keel.cache"] = "miss"
        elif self.cache_bypass:
            rec.attributes["keel.cache"] = f"bypass: {self.cache_bypass}"
        if self.skipped:
            rec.attributes["keel.skipped"] = [
                {"deployment": d.label, "reason": why} for d, why in self.skipped
            ]

    def child_spans(self, parent: SpanRecord) -> list[SpanRecord]:
        """One child span per attempt (written only when there was more than one, or a skip)."""
        base_pc, base_t = self.req.start_pc, self.req.start
        out = []
        for i, (dep, n, name, t0, t1, err) in enumerate(self.attempts, 1):
            out.append(
                SpanRecord(
                    trace_id=parent.trace_id,
                    span_id=new_span_id(),
                    parent_span_id=parent.span_id,
                    name=f"attempt {i}: {dep.label}",
                    kind="attempt",
                    start_time=base_t + (t0 - base_pc),
                    end_time=base_t + (t1 - base_pc),
                    status="error" if err else "ok",
                    status_code=err.status if err else 200,
                    error=f"{err.code}: {err.message}" if err else None,
                    project_id=parent.project_id,
                    key_id=parent.key_id,
                    team_id=parent.team_id,
                    requested_model=name,
                    model=dep.config.upstream_model,
                    provider=dep.config.provider,
                    attributes={"keel.deployment": dep.label, "keel.attempt": n, "keel.model_name": name},
                )
            )
        return out


def _classify(err: KeelError) -> str:
    """client: the request is wrong (no retry, no fallback); context/policy: use those fallbacks;
    no-retry: this deployment cannot serve it (try the next); retry: transient."""
    if err.code in ("context_length_exceeded", "context_window_exceeded"):
        return "context"
    if err.code in ("content_policy_violation", "content_filter"):
        return "policy"
    if err.status < 500 and err.status != 429 and err.status != 408:
        return "client"
    if err.code == "upstream_auth_error":
        return "no-retry"
    return "retry"


def _retry_after(err: KeelError) -> float | None:
    value = err.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _backoff(attempt: int, cfg: RetryConfig, retry_after: float | None) -> float:
    """Exponential backoff with jitter; never shorter than the upstream's retry-after."""
    delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** (attempt - 1)))
    delay = random.uniform(delay / 2, delay)
    return max(delay, retry_after or 0.0)


async def _first_chunk(stream: Any, idle: float | None, label: str) -> tuple[Any, bytes]:
    """Pull the first chunk of a stream before committing to it (failures here can still fall back)."""
    it = stream.__aiter__()
    try:
        chunk: bytes = await (asyncio.wait_for(it.__anext__(), idle) if idle else it.__anext__())
    except StopAsyncIteration:
        raise UpstreamError(f"upstream {label} sent an empty stream", code="upstream_bad_response") from None
    except TimeoutError:
        raise UpstreamTimeout(f"upstream {label} sent nothing for {idle}s") from None
    return it, chunk


def _prompt_estimate(body: dict[str, Any]) -> int:
    from keel.gateway.tokens import count_messages

    return count_messages(body.get("messages") or [])


def _parse_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_request")
    return body
