"""Anthropic-compatible ingress: `POST /v1/messages` in front of any provider.

The request is translated to the OpenAI shape and goes through the same pipeline as
`/v1/chat/completions` (routing, retries, fallbacks, tracing); the answer — whole or streamed —
is translated back into Anthropic's wire format, and errors come in Anthropic's error shape.
"""

from __future__ import annotations

from typing import Any

import orjson

from keel.errors import BadRequest, KeelError, anthropic_error_body
from keel.gateway.asgi import ClientGone, Receive, Scope, Send, read_body, send_bytes
from keel.gateway.core import _SSE_HEADERS, Gateway, _parse_object, _Req
from keel.providers.anthropic_format import (
    OpenAIToAnthropicStream,
    TranslationError,
    anthropic_to_openai_request,
    openai_to_anthropic_response,
)
from keel.providers.base import SSEParser
from keel.types import ChatResult

__all__ = ["AnthropicResponder", "messages_endpoint"]

ROUTE = "/v1/messages"


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicResponder:
    """Writes the pipeline's OpenAI-shaped results as Anthropic Messages responses and events."""

    def __init__(self, send: Send, trace_id: str, requested_model: str) -> None:
        self._send = send
        self._hdrs = [(b"x-keel-trace-id", trace_id.encode()), (b"request-id", trace_id.encode())]
        self._model = requested_model
        self._t = OpenAIToAnthropicStream(requested_model)
        self._parser = SSEParser()
        self._errored = False

    def add_header(self, name: bytes, value: bytes) -> None:
        self._hdrs.append((name, value))

    async def complete(self, result: ChatResult) -> None:
        body = openai_to_anthropic_response(result.body, self._model)
        await send_bytes(self._send, 200, orjson.dumps(body), self._hdrs)

    async def error(self, err: KeelError) -> None:
        extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
        await send_bytes(self._send, err.status, anthropic_error_body(err), self._hdrs + extra)

    async def stream_start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + self._hdrs})

    async def _write(self, events: list[tuple[str, Any]]) -> None:
        if events:
            body = b"".join(_sse(e, d) for e, d in events)
            await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def stream_chunk(self, chunk: bytes) -> None:
        events: list[tuple[str, Any]] = []
        for raw in self._parser.feed(chunk):
            _, payload = SSEParser.fields(raw)
            if not payload or payload == b"[DONE]":
                continue
            try:
                events += self._t.feed(orjson.loads(payload))
            except TranslationError as exc:
                raise BadRequest(str(exc), code="untranslatable_stream") from None
        await self._write(events)

    async def stream_error(self, err: KeelError) -> None:
        etype = "overloaded_error" if err.status in (429, 503) else "api_error"
        self._errored = True  # an error event ends an Anthropic stream: no closing events after it
        await self._write([("error", {"type": "error", "error": {"type": etype, "message": err.message}})])

    async def stream_end(self) -> None:
        if not self._errored:
            await self._write(self._t.finish())
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _validate(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required", code="missing_model", param="model")
    mt = body.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise BadRequest(
            "max_tokens: a positive integer is required", code="invalid_request", param="max_tokens"
        )
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(
            "messages: at least one message is required", code="invalid_messages", param="messages"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant'", code="invalid_messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("stream: must be a boolean", code="invalid_request", param="stream")


def messages_endpoint(gateway: Gateway) -> Any:
    """The ASGI handler of POST /v1/messages for ``gateway``."""

    async def messages(scope: Scope, receive: Receive, send: Send) -> None:
        req = _Req(scope)
        out = AnthropicResponder(send, req.trace_id, "")
        name = "messages"
        try:
            if scope["method"] != "POST":
                raise KeelError("use POST", status=405, code="method_not_allowed")
            req.principal = gateway.authenticate(req)
            raw = await read_body(scope, receive, gateway.limit, req.content_length)
            body = req.body = _parse_object(raw)
            _validate(body)
            out._model = body["model"]
            out._t.model = body["model"]
            try:
                oai = anthropic_to_openai_request(body)
            except TranslationError as exc:
                raise BadRequest(str(exc), code="untranslatable_request") from None
        except ClientGone:
            return
        except KeelError as err:
            rec = gateway._span(req, name, err.status, err)
            gateway._finish(req, rec, ROUTE)
            try:
                await out.error(err)
            except OSError:
                pass
            return
        await gateway.serve_chat(req, oai, out, ROUTE, name)

    return messages
