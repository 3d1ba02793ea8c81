"""The gateway's hot path, as raw ASGI handlers: auth → validate → route → provider → trace.

Nothing here touches the database: keys come from :class:`KeyCache`, models from
:class:`ModelTable`, and the finished span goes to the :class:`TraceWriter` queue.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from keel.config import Settings
from keel.errors import BadRequest, Forbidden, KeelError, NotFound, Unauthorized, UpstreamError
from keel.gateway.asgi import ClientGone, Receive, Scope, Send, read_body, send_bytes, send_error
from keel.gateway.auth import KeyCache, bearer_token
from keel.gateway.routing import ModelTable
from keel.gateway.stats import GatewayStats
from keel.tracing import TraceWriter, new_span_id, new_trace_id, parse_traceparent
from keel.types import Principal, SpanRecord, Usage

__all__ = ["Gateway"]

log = logging.getLogger("keel.gateway")

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_ROUTE_CHAT = "/v1/chat/completions"


class _Req:
    """What the hot path learns about one request, turned into a span at the end."""

    __slots__ = (
        "auth",
        "body",
        "content_length",
        "metadata",
        "parent",
        "principal",
        "session",
        "span_id",
        "start",
        "start_pc",
        "tags",
        "trace_id",
        "x_api_key",
    )

    def __init__(self, scope: Scope) -> None:
        self.start = time.time()
        self.start_pc = time.perf_counter()
        self.auth: str | None = None
        self.x_api_key: str | None = None
        self.content_length: bytes | None = None
        tp: str | None = None
        tags: str | None = None
        meta: str | None = None
        session: str | None = None
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


class Gateway:
    """OpenAI-compatible gateway endpoints over a model table, a key cache and a trace writer."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyCache,
        models: ModelTable,
        writer: TraceWriter,
        stats: GatewayStats | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.models = models
        self.writer = writer
        self.stats = stats or GatewayStats()
        self.limit = settings.max_request_bytes

    # -- shared steps -----------------------------------------------------------------------------

    def _span(self, req: _Req, name: str, status_code: int, error: KeelError | None = None) -> SpanRecord:
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
            kind="llm",
            start_time=req.start,
            end_time=time.time(),
            status="error" if error else "ok",
            status_code=status_code,
            error=f"{error.code}: {error.message}" if error else None,
            project_id=p.project_id if p else None,
            key_id=p.key_id if p else None,
            requested_model=body.get("model") if isinstance(body.get("model"), str) else None,
            user=user if isinstance(user, str) else None,
            session_id=req.session,
            tags=req.tags,
            metadata=meta,
            input=req.body,
            stream=bool(body.get("stream")),
        )

    def _finish(self, req: _Req, rec: SpanRecord, route: str) -> None:
        elapsed = time.perf_counter() - req.start_pc
        model = rec.requested_model or "-"
        st = self.stats
        st.requests[(route, model, str(rec.status_code))] += 1
        st.latency[route].observe(elapsed)
        if rec.status == "error" and rec.error:
            st.errors[(route, rec.error.split(":", 1)[0])] += 1
        if rec.usage.input_tokens:
            st.tokens[(model, "input")] += rec.usage.input_tokens
        if rec.usage.output_tokens:
            st.tokens[(model, "output")] += rec.usage.output_tokens
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
        p = self.keys.lookup(key)
        if p is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return p

    def parse_chat(self, raw: bytes) -> dict[str, Any]:
        if not raw:
            raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_request")
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
        name = "chat.completions"
        if scope["method"] != "POST":
            await self._fail(
                req, send, KeelError("use POST", status=405, code="method_not_allowed"), _ROUTE_CHAT, name
            )
            return
        try:
            req.principal = self.authenticate(req)
            raw = await read_body(scope, receive, self.limit, req.content_length)
            body = req.body = self.parse_chat(raw)
            model = body["model"]
            dep = self.models.choose(model)
            if dep is None:
                raise NotFound(
                    f"model '{model}' does not exist or is not served here",
                    code="model_not_found",
                    param="model",
                )
            if not req.principal.may_use(model):
                raise Forbidden(f"this key is not allowed to use model '{model}'", code="model_not_allowed")
        except ClientGone:
            return
        except KeelError as err:
            await self._fail(req, send, err, _ROUTE_CHAT, name)
            return

        upstream_headers = {"traceparent": f"00-{req.trace_id}-{req.span_id}-01"}
        rec: SpanRecord
        if body.get("stream"):
            await self._stream(req, send, body, dep, upstream_headers)
            return
        t_up = time.perf_counter()
        try:
            result = await dep.provider.chat(body, upstream_headers)
        except KeelError as err:
            rec = self._span(req, name, err.status, err)
            self._describe(rec, dep)
            self._finish(req, rec, _ROUTE_CHAT)
            await send_error(send, err, [(b"x-keel-trace-id", req.trace_id.encode())])
            return
        up_elapsed = time.perf_counter() - t_up
        payload = result.raw if result.raw is not None else orjson.dumps(result.body)
        hdrs = [(b"x-keel-trace-id", req.trace_id.encode())]
        try:
            await send_bytes(send, 200, payload, hdrs)
        finally:
            rec = self._span(req, name, 200)
            self._describe(rec, dep)
            rec.model = result.served_model or dep.config.upstream_model
            rec.usage = result.usage
            rec.output = result.body
            self.stats.overhead[_ROUTE_CHAT].observe(
                max(0.0, time.perf_counter() - req.start_pc - up_elapsed)
            )
            self._finish(req, rec, _ROUTE_CHAT)

    @staticmethod
    def _describe(rec: SpanRecord, dep: Any) -> None:
        rec.provider = dep.config.provider
        rec.deployment = f"{dep.config.name}:{dep.config.provider}:{dep.config.upstream_model}"
        rec.model = dep.config.upstream_model
        rec.price_override = dep.price_override

    async def _stream(
        self, req: _Req, send: Send, body: dict[str, Any], dep: Any, upstream_headers: dict[str, str]
    ) -> None:
        name = "chat.completions"
        hdrs = [(b"x-keel-trace-id", req.trace_id.encode())]
        try:
            stream = await dep.provider.chat_stream(body, upstream_headers)
        except KeelError as err:
            rec = self._span(req, name, err.status, err)
            self._describe(rec, dep)
            self._finish(req, rec, _ROUTE_CHAT)
            await send_error(send, err, hdrs)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + hdrs})
        first: float | None = None
        error: KeelError | None = None
        client_gone = False
        try:
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except KeelError as err:
            error = err
        except OSError:
            client_gone = True
        except Exception as exc:  # never let a provider bug turn into a hung stream
            log.exception("stream failed")
            error = UpstreamError(f"stream failed: {type(exc).__name__}")
        if error is not None:
            event = (
                b'data: {"error": '
                + orjson.dumps({"message": error.message, "type": error.type, "code": error.code})
                + b"}\n\n"
            )
            try:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            except OSError:
                client_gone = True
        if not client_gone:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                client_gone = True
        rec = self._span(
            req, name, 200 if error is None and not client_gone else (error.status if error else 499), error
        )
        if client_gone and error is None:
            rec.status, rec.error = "error", "client_disconnected: the client closed the stream"
        self._describe(rec, dep)
        rec.model = stream.served_model or dep.config.upstream_model
        usage = stream.usage
        if usage.input_tokens is None and usage.output_tokens is None:
            usage = _estimate_usage(body, stream.output_text)
        rec.usage = usage
        rec.output = {
            "role": "assistant",
            "content": stream.output_text or None,
            **({"tool_calls": stream.tool_calls} if stream.tool_calls else {}),
            "finish_reason": stream.finish_reason,
        }
        if first is not None:
            rec.ttft_ms = (first - req.start_pc) * 1000.0
            self.stats.ttft[_ROUTE_CHAT].observe(first - req.start_pc)
        self._finish(req, rec, _ROUTE_CHAT)

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
