"""A real HTTP mock LLM provider (OpenAI + Anthropic wire formats) with fault injection.

``keel.testing`` runs a tiny raw-ASGI app under uvicorn that speaks enough of the OpenAI Chat
Completions / Embeddings / Models API and the Anthropic Messages API for SDKs, proxies and gateways
to talk to it as if it were the real upstream.  It is used by keel's own integration tests and
benchmarks, and is shipped so that users can test their own code against it.

In-process usage (the server runs in a background thread with its own event loop)::

    from keel.testing import MockProvider

    with MockProvider() as mock:                       # port=0 -> a free port is picked
        client = openai.OpenAI(base_url=mock.base_url, api_key="x")
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert mock.requests[-1].headers["authorization"] == "Bearer x"

        anthropic.Anthropic(base_url=mock.url, api_key="x")  # Anthropic SDK: no "/v1" suffix

pytest fixture (function scoped, yields a started :class:`MockProvider`)::

    # conftest.py
    from keel.testing import mock_provider  # noqa: F401

Replies are deterministic: ``"Mock reply to: <last user message, truncated to 200 chars>"`` unless a
fixed ``reply`` is configured.  Token usage is a cheap word-count approximation.  ``max_tokens`` /
``max_completion_tokens`` smaller than the reply's word count truncates the reply (finish reason
``length`` / stop reason ``max_tokens``).  If the request has ``tools`` and the last message is a user
message containing the word ``tool`` (or ``tool_choice`` forces a tool), the mock answers with a tool
call whose arguments are built from the tool schema's required properties.

Fault injection, either per request with the model name (``"model": "fault:<kind>"``) or for the
whole server with :meth:`MockProvider.set_fault` (``mock.set_fault("500", times=2)``):

=====================  =======================================================================
``<status>[:<s>]``      any 4xx/5xx status (``500``, ``400``, ``401``, ``429``, ``503``, ``529``...)
                        with a provider-shaped error body; ``429`` always sends ``retry-after``
                        (default 1), other statuses only when ``:<s>`` is given
``context``             400 ``context_length_exceeded`` (Anthropic: ``prompt is too long``)
``slow:<s>``            sleep ``s`` seconds before answering (before the first byte of a stream)
``drip:<s>``            streams only: sleep ``s`` seconds between SSE events
``reset``               abort the TCP connection (RST) without sending any HTTP response
``cut:<n>``             streams: send ``n`` SSE events, then close the connection mid-body (no
                        ``[DONE]`` / ``message_stop``); non-streaming: same as ``reset``
``badjson``             200 with a malformed JSON body (streams: a malformed SSE ``data:`` event)
``empty``               200 with an empty body
=====================  =======================================================================

A per-request fault takes precedence over (and does not consume) a server-wide fault.  Server-wide
faults apply to every ``/v1/*`` route, never to ``/health`` or the ``/_mock/*`` control routes.

Scripted replies (e.g. an LLM judge's outputs, well-formed or not): a request whose model is
``"script:<id>"`` gets its text from :meth:`MockProvider.script` — either the next reply of a queue
(``mock.script("judge", ['{"score": 4}', "not json"])``; 400 ``script_exhausted`` once it is empty)
or a function of the request body (``mock.script("rag", lambda req: ...)``, for concurrent callers).
The scripted text is returned as is, whatever ``response_format`` or ``max_tokens`` say; chat and
messages routes, streaming or not.  ``POST /_mock/script`` (``{"id": "judge", "replies": [...]}``)
queues replies from another process.

Out-of-process usage (benchmarks): ``python -m keel.testing --host 127.0.0.1 --port 9100 --workers 4``
(uvloop + httptools, no access log, recording off unless ``--record``).  The control routes
``POST /_mock/fault`` (``{"fault": "500", "times": 2}``), ``POST /_mock/reset`` and
``GET /_mock/requests`` allow driving such a server from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
import uvicorn

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "MockProvider",
    "MockState",
    "RecordedRequest",
    "create_mock_app",
    "main",
    "mock_embedding",
    "mock_provider",
    "parse_fault",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Fault kinds understood by :func:`parse_fault` (``<status>`` means any HTTP status 400-599).
FAULT_KINDS: tuple[str, ...] = ("<status>", "context", "slow", "drip", "reset", "cut", "badjson", "empty")

DEFAULT_MAX_RECORDED = 10_000
MOCK_MODELS: tuple[str, ...] = (
    "mock-model",
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "claude-sonnet-4-5",
    "claude-3-5-haiku-latest",
)

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}{os.getpid():06x}{next(_ids):018x}"


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """A parsed fault specification (see :func:`parse_fault`)."""

    kind: str
    """``status``, ``context``, ``slow``, ``drip``, ``reset``, ``cut``, ``badjson`` or ``empty``."""
    status: int = 0
    retry_after: float | None = None
    seconds: float = 0.0
    count: int = 0
    spec: str = ""


_NO_ARG_KINDS = frozenset({"context", "reset", "badjson", "empty"})


def parse_fault(spec: str) -> Fault:
    """Parse a fault spec such as ``"500"``, ``"429:2"``, ``"slow:0.5"``, ``"cut:3"`` or ``"reset"``.

    A leading ``"fault:"`` prefix (as used in model names) is accepted.  Raises ``ValueError`` for an
    unknown or malformed spec.
    """
    return _parse_fault_cached(spec)


@lru_cache(maxsize=512)
def _parse_fault_cached(spec: str) -> Fault:
    text = spec.strip()
    if text.startswith("fault:"):
        text = text[len("fault:") :]
    kind, *args = text.split(":")
    kind = kind.strip().lower()
    try:
        if kind.isdigit():
            status = int(kind)
            if not 400 <= status <= 599 or len(args) > 1:
                raise ValueError
            retry_after = _non_negative(float(args[0])) if args else (1.0 if status == 429 else None)
            return Fault("status", status=status, retry_after=retry_after, spec=text)
        if kind in _NO_ARG_KINDS:
            if args:
                raise ValueError
            return Fault(kind, spec=text)
        if kind in ("slow", "drip"):
            if len(args) != 1:
                raise ValueError
            return Fault(kind, seconds=_non_negative(float(args[0])), spec=text)
        if kind == "cut":
            if len(args) != 1:
                raise ValueError
            return Fault(kind, count=int(_non_negative(int(args[0]))), spec=text)
    except ValueError:
        pass
    raise ValueError(
        f"invalid mock fault {spec!r}; expected one of: <status>[:<retry_after>] (400-599), context, "
        "slow:<seconds>, drip:<seconds>, reset, cut:<n>, badjson, empty"
    )


def _non_negative(value: float) -> float:
    if value < 0 or math.isnan(value) or math.isinf(value):
        raise ValueError
    return value


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request received by the mock server."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Request headers, names lower-cased (repeated headers joined with ``", "``)."""
    json: Any
    """The parsed JSON body, or ``None`` when the body is empty or not valid JSON."""
    body: bytes
    time: float
    """``time.time()`` when the request was received."""


class MockState:
    """Mutable, thread-safe state shared by the mock ASGI app and its controller.

    The app runs on the server's event loop thread while tests call :meth:`set_fault` / read
    :attr:`requests` from other threads, hence the lock.
    """

    def __init__(
        self,
        reply: str | None = None,
        embedding_dim: int = 8,
        *,
        record: bool = True,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        require_auth: bool = False,
    ) -> None:
        if embedding_dim <= 0:
            raise ValueError("embedding_dim must be > 0")
        self.reply = reply
        self.embedding_dim = embedding_dim
        self.record = record
        self.require_auth = require_auth
        self.request_count = 0
        self._lock = threading.Lock()
        self._requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._fault: Fault | None = None
        self._fault_remaining: int | None = None
        self._scripts: dict[str, deque[str] | Callable[[dict[str, Any]], str]] = {}

    # -- faults ------------------------------------------------------------------------------------
    def set_fault(self, fault: str | None, times: int | None = None) -> None:
        """Set (or clear with ``None``) a server-wide fault, optionally only for the next ``times`` requests."""
        parsed = None if fault is None else parse_fault(fault)
        if times is not None and times < 0:
            raise ValueError("times must be >= 0")
        with self._lock:
            if parsed is None or times == 0:
                self._fault, self._fault_remaining = None, None
            else:
                self._fault, self._fault_remaining = parsed, times

    @property
    def fault(self) -> Fault | None:
        """The currently active server-wide fault, if any."""
        return self._fault

    def take_fault(self) -> Fault | None:
        """Return the active server-wide fault for one request, consuming one of its ``times``."""
        if self._fault is None:  # lock-free fast path
            return None
        with self._lock:
            fault = self._fault
            if fault is not None and self._fault_remaining is not None:
                self._fault_remaining -= 1
                if self._fault_remaining <= 0:
                    self._fault, self._fault_remaining = None, None
            return fault

    # -- scripted replies ----------------------------------------------------------------------------
    def script(self, script_id: str, replies: Sequence[str] | Callable[[dict[str, Any]], str] | None) -> None:
        """Script the replies of model ``script:<script_id>``: a queue of texts, a function of the
        request body, or ``None`` to forget the script."""
        with self._lock:
            if replies is None:
                self._scripts.pop(script_id, None)
            elif callable(replies):
                self._scripts[script_id] = replies
            else:
                self._scripts[script_id] = deque(str(r) for r in replies)

    def scripted_reply(self, model: str, req: dict[str, Any]) -> str | None:
        """The scripted text for a ``script:<id>`` model, or None for any other model."""
        if not model.startswith("script:"):
            return None
        script_id = model[len("script:") :]
        with self._lock:
            source = self._scripts.get(script_id)
            if isinstance(source, deque):
                if not source:
                    raise _HTTPError(
                        400,
                        f"no scripted reply left for {model}",
                        "invalid_request_error",
                        "script_exhausted",
                    )
                return source.popleft()
        if source is None:
            raise _HTTPError(400, f"no script named {script_id!r}", "invalid_request_error", "script_unknown")
        return str(source(req))

    # -- recording ---------------------------------------------------------------------------------
    def record_request(self, request: RecordedRequest) -> None:
        """Append a request to the (capped) record."""
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget all recorded requests."""
        with self._lock:
            self._requests.clear()
            self.request_count = 0

    def reset(self) -> None:
        """Forget recorded requests and clear the server-wide fault."""
        with self._lock:
            self._requests.clear()
            self.request_count = 0
            self._fault, self._fault_remaining = None, None


# --------------------------------------------------------------------------------------------------
# Helpers: text, tokens, schemas, embeddings
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


def _split_pieces(text: str) -> list[str]:
    """Split ``text`` word by word so that ``"".join(pieces) == text``."""
    parts = text.split(" ")
    return [parts[0], *(" " + p for p in parts[1:])] if text else []


def _fragments(text: str, size: int = 8) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _truncate(text: str, limit: Any) -> tuple[str, bool]:
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        words = text.split()
        if len(words) > limit:
            return " ".join(words[:limit]), True
    return text, False


def _placeholder(schema: Any, root: Any, all_properties: bool, depth: int = 0) -> Any:
    """A value satisfying (simple) JSON schemas: objects, arrays, scalars, enums, refs, unions."""
    if depth > 8 or not isinstance(schema, dict):
        return "mock"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _placeholder(target, root, all_properties, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for union in ("anyOf", "oneOf", "allOf"):
        options = schema.get(union)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _placeholder((non_null or options)[0], root, all_properties, depth + 1)
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ == "object" or (typ is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        required = schema.get("required")
        names = list(props) if all_properties else [n for n in required or () if n in props]
        return {n: _placeholder(props[n], root, all_properties, depth + 1) for n in names}
    if typ == "array":
        return [_placeholder(schema.get("items", {}), root, all_properties, depth + 1)]
    if typ == "integer":
        return 1
    if typ == "number":
        return 1.5
    if typ == "boolean":
        return True
    if typ == "null":
        return None
    return "mock"


def _tool_arguments(parameters: Any) -> dict[str, Any]:
    value = _placeholder(parameters, parameters, all_properties=False) if isinstance(parameters, dict) else {}
    return value if isinstance(value, dict) else {}


def mock_embedding(text: str, dim: int = 8) -> list[float]:
    """The deterministic unit-length embedding (float32 values) the mock returns for ``text``."""
    return list(struct.unpack(f"<{dim}f", _embedding_bytes(text, dim)))


@lru_cache(maxsize=8192)
def _embedding_bytes(text: str, dim: int) -> bytes:
    encoded = text.encode("utf-8")
    raw = bytearray()
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.blake2b(counter.to_bytes(4, "little") + encoded, digest_size=64).digest()
        counter += 1
    values = [(v / 2147483648.0) - 1.0 for v in struct.unpack(f"<{dim}I", bytes(raw[: dim * 4]))]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return struct.pack(f"<{dim}f", *(v / norm for v in values))


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------

_JSON_HEADERS = ((b"content-type", b"application/json"),)
_SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, etype: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.etype, self.code = status, message, etype, code


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False) or message["type"] != "http.request":
            return b"".join(chunks)


async def _send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = _JSON_HEADERS,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _error_body(
    anthropic: bool, message: str, etype: str, code: str | None = None, param: Any = None
) -> bytes:
    if anthropic:
        return orjson.dumps(
            {
                "type": "error",
                "error": {"type": etype, "message": message},
                "request_id": _new_id("req_"),
            }
        )
    return orjson.dumps({"error": {"message": message, "type": etype, "param": param, "code": code}})


def _status_fault_body(anthropic: bool, status: int) -> bytes:
    message = f"Mock fault: HTTP {status}"
    if anthropic:
        etype = _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return _error_body(True, message, etype)
    etype, code = _OPENAI_ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return _error_body(False, message, etype, code)


def _find_transport(send: Send) -> Any:
    """The asyncio transport behind uvicorn's ``send`` (a bound method of its request cycle)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    return transport if transport is not None and hasattr(transport, "abort") else None


async def _drop_connection(receive: Receive, send: Send, *, reset: bool, started: bool) -> None:
    """Close the client connection without completing the HTTP response.

    ``reset=True`` aborts with ``SO_LINGER 0`` so that the peer gets a TCP RST; otherwise the
    connection is closed gracefully after flushing what was already written (a FIN mid-body).
    """
    transport = _find_transport(send)
    if transport is None:
        # Unknown server: fall back to an incomplete response (the client still sees a broken connection).
        if not started:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]}
            )
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise ConnectionAbortedError("mock fault: connection dropped")
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError, ValueError, TypeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
    # Wait until the server has noticed the disconnect, so it doesn't try to send a 500 itself.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            while (await receive())["type"] != "http.disconnect":
                pass


async def _send_sse(receive: Receive, send: Send, events: list[bytes], fault: Fault | None) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)})
    if fault is not None and fault.kind == "cut":
        for event in events[: min(fault.count, len(events) - 1)]:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await _drop_connection(receive, send, reset=False, started=True)
        return
    drip = fault.seconds if fault is not None and fault.kind == "drip" else 0.0
    last = len(events) - 1
    for i, event in enumerate(events):
        if drip and i:
            await asyncio.sleep(drip)
        await send({"type": "http.response.body", "body": event, "more_body": i != last})
    if last < 0:
        await send({"type": "http.response.body", "body": b""})


def _sse_openai(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _sse_anthropic(event: str, payload: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# --------------------------------------------------------------------------------------------------
# OpenAI: chat completions
# --------------------------------------------------------------------------------------------------


def _openai_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _require_model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise _HTTPError(400, "you must provide a model parameter", "invalid_request_error", "missing_model")
    return model


def _chat_tool(req: dict[str, Any], messages: list[Any], last_text: str) -> dict[str, Any] | None:
    tools = [t for t in req.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not tools:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool["function"].get("name") == forced:
                return dict(tool["function"])
    if choice == "required":
        return dict(tools[0]["function"])
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "user" and "tool" in last_text.lower():
        return dict(tools[0]["function"])
    return None


def _chat_completion(state: MockState, req: dict[str, Any], fault: Fault | None) -> tuple[bool, Any]:
    """Returns ``(stream, payload)``: payload is a JSON-able object or a list of SSE event bytes."""
    model = _require_model(req)
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HTTPError(
            400, "'messages' must be a non-empty array", "invalid_request_error", "invalid_value"
        )
    prompt_tokens = 3
    last_user = ""
    for msg in messages:
        if not isinstance(msg, dict):
            raise _HTTPError(400, "each message must be an object", "invalid_request_error")
        text = _openai_text(msg.get("content"))
        prompt_tokens += 3 + _words(text)
        if msg.get("role") == "user":
            last_user = text
    last_text = _openai_text(messages[-1].get("content"))

    scripted = state.scripted_reply(model, req)
    tool = _chat_tool(req, messages, last_text) if scripted is None else None
    content: str | None = None
    tool_call: dict[str, Any] | None = None
    finish = "stop"
    if scripted is not None:
        content = scripted
        completion_tokens = max(1, _words(content))
    elif tool is not None:
        arguments = orjson.dumps(_tool_arguments(tool.get("parameters"))).decode()
        tool_call = {
            "id": _new_id("call_"),
            "type": "function",
            "function": {"name": tool.get("name"), "arguments": arguments},
        }
        completion_tokens = 1 + _words(arguments)
        finish = "tool_calls"
    else:
        base = state.reply if state.reply is not None else f"Mock reply to: {last_user[:200]}"
        rf = req.get("response_format")
        rf_type = rf.get("type") if isinstance(rf, dict) else None
        if rf_type == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf, dict) else None
            obj = _placeholder(schema, schema, all_properties=True) if isinstance(schema, dict) else None
            content = orjson.dumps(obj if isinstance(obj, dict) and obj else {"reply": base}).decode()
        elif rf_type == "json_object":
            content = orjson.dumps({"reply": base}).decode()
        else:
            limit = req.get("max_completion_tokens", req.get("max_tokens"))
            content, truncated = _truncate(base, limit)
            if truncated:
                finish = "length"
        completion_tokens = max(1, _words(content))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    cid = _new_id("chatcmpl-mock")
    created = int(time.time())
    stream = req.get("stream") is True

    if not stream:
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if tool_call is not None:
            message["tool_calls"] = [tool_call]
        return False, {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
            "system_fingerprint": "fp_keel_mock",
        }

    stream_options = req.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    base_chunk: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_keel_mock",
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload = {
            **base_chunk,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            payload["usage"] = None
        return _sse_openai(payload)

    if fault is not None and fault.kind == "badjson":
        return True, [b'data: {"id": "x", "choices": [\n\n', b"data: [DONE]\n\n"]
    events: list[bytes] = []
    if tool_call is not None:
        fn = tool_call["function"]
        first = {
            "index": 0,
            "id": tool_call["id"],
            "type": "function",
            "function": {"name": fn["name"], "arguments": ""},
        }
        events.append(chunk({"role": "assistant", "content": None, "tool_calls": [first], "refusal": None}))
        for fragment in _fragments(fn["arguments"]):
            events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
    else:
        events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        for piece in _split_pieces(content or ""):
            events.append(chunk({"content": piece}))
    events.append(chunk({}, finish))
    if include_usage:
        events.append(_sse_openai({**base_chunk, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return True, events


# --------------------------------------------------------------------------------------------------
# Anthropic: messages
# --------------------------------------------------------------------------------------------------


def _anthropic_text(content: Any, *, text_only: bool) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif not text_only and block.get("type") == "tool_result":
            parts.append(_anthropic_text(block.get("content"), text_only=False))
    return " ".join(parts)


def _anthropic_input_tokens(req: dict[str, Any]) -> tuple[int, str, str]:
    """Returns ``(input_tokens, last user text, last message text blocks)``."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _HTTPError(400, "messages: at least one message is required", "invalid_request_error")
    tokens = 3 + _words(_anthropic_text(req.get("system"), text_only=False))
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise _HTTPError(400, "messages: each message must be an object", "invalid_request_error")
        text = _anthropic_text(message.get("content"), text_only=False)
        tokens += 3 + _words(text)
        if message.get("role") == "user":
            last_user = _anthropic_text(message.get("content"), text_only=True) or text
    last = messages[-1]
    last_text = _anthropic_text(last.get("content"), text_only=True) if last.get("role") == "user" else ""
    return tokens, last_user, last_text


def _anthropic_tool(req: dict[str, Any], last_text: str) -> dict[str, Any] | None:
    tools = [t for t in req.get("tools") or () if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if not tools:
        return None
    choice = req.get("tool_choice")
    if not isinstance(choice, dict):
        choice = {}
    ctype = choice.get("type")
    if ctype == "none":
        return None
    if ctype == "tool":
        for tool in tools:
            if tool["name"] == choice.get("name"):
                return tool
    if ctype == "any":
        return tools[0]
    return tools[0] if "tool" in last_text.lower() else None


def _anthropic_message(state: MockState, req: dict[str, Any], fault: Fault | None) -> tuple[bool, Any]:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise _HTTPError(400, "model: Field required", "invalid_request_error")
    max_tokens = req.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _HTTPError(400, "max_tokens: Field required (integer >= 1)", "invalid_request_error")
    input_tokens, last_user, last_text = _anthropic_input_tokens(req)
    scripted = state.scripted_reply(model, req)
    tool = _anthropic_tool(req, last_text) if scripted is None else None
    mid = _new_id("msg_mock")
    block: dict[str, Any]
    if scripted is not None:
        block = {"type": "text", "text": scripted}
        output_tokens = max(1, _words(scripted))
        stop_reason = "end_turn"
    elif tool is not None:
        tool_input = _tool_arguments(tool.get("input_schema"))
        block = {
            "type": "tool_use",
            "id": _new_id("toolu_mock"),
            "name": tool["name"],
            "input": tool_input,
        }
        arguments = orjson.dumps(tool_input).decode()
        output_tokens = 1 + _words(arguments)
        stop_reason = "tool_use"
    else:
        base = state.reply if state.reply is not None else f"Mock reply to: {last_user[:200]}"
        text, truncated = _truncate(base, max_tokens)
        block = {"type": "text", "text": text}
        output_tokens = max(1, _words(text))
        stop_reason = "max_tokens" if truncated else "end_turn"
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if req.get("stream") is not True:
        return False, {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [block],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
    if fault is not None and fault.kind == "badjson":
        return True, [b'event: message_start\ndata: {"type": "message_start", "message": {\n\n']
    start_message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events = [_sse_anthropic("message_start", {"type": "message_start", "message": start_message})]
    if tool is not None:
        start_block = {**block, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": f} for f in _fragments(arguments)]
    else:
        start_block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in _split_pieces(block["text"])]
    events.append(
        _sse_anthropic(
            "content_block_start", {"type": "content_block_start", "index": 0, "content_block": start_block}
        )
    )
    events.append(_sse_anthropic("ping", {"type": "ping"}))
    for delta in deltas:
        events.append(
            _sse_anthropic("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events.append(_sse_anthropic("content_block_stop", {"type": "content_block_stop", "index": 0}))
    events.append(
        _sse_anthropic(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    events.append(_sse_anthropic("message_stop", {"type": "message_stop"}))
    return True, events


def _anthropic_count_tokens(req: dict[str, Any]) -> dict[str, Any]:
    tokens, _, _ = _anthropic_input_tokens(req)
    return {"input_tokens": tokens}


# --------------------------------------------------------------------------------------------------
# OpenAI: embeddings, models
# --------------------------------------------------------------------------------------------------


def _embeddings(state: MockState, req: dict[str, Any]) -> dict[str, Any]:
    model = _require_model(req)
    raw = req.get("input")
    texts: list[str] = []
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
        texts = [" ".join(map(str, raw))]
    elif isinstance(raw, list) and raw:
        for item in raw:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, list) and all(isinstance(t, int) for t in item):
                texts.append(" ".join(map(str, item)))
            else:
                texts = []
                break
    if not texts:
        raise _HTTPError(
            400, "'input' must be a non-empty string or array", "invalid_request_error", "invalid_value"
        )
    dim = req.get("dimensions")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= 65536:
        dim = state.embedding_dim
    as_base64 = req.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, text in enumerate(texts):
        packed = _embedding_bytes(text, dim)
        vector: Any = (
            base64.b64encode(packed).decode() if as_base64 else list(struct.unpack(f"<{dim}f", packed))
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens += max(1, _words(text))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "keel-mock"}


_MODELS_BODY = orjson.dumps({"object": "list", "data": [_model_object(m) for m in MOCK_MODELS]})
_HEALTH_BODY = orjson.dumps({"status": "ok"})

# path -> (method, handler name, anthropic-shaped errors)
_ROUTES: dict[str, tuple[str, str, bool]] = {
    "/v1/chat/completions": ("POST", "chat", False),
    "/v1/messages": ("POST", "messages", True),
    "/v1/messages/count_tokens": ("POST", "count_tokens", True),
    "/v1/embeddings": ("POST", "embeddings", False),
    "/v1/models": ("GET", "models", False),
    "/health": ("GET", "health", False),
}


# --------------------------------------------------------------------------------------------------
# The ASGI app
# --------------------------------------------------------------------------------------------------


def _headers_dict(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


def _has_auth(raw: Sequence[tuple[bytes, bytes]]) -> bool:
    for key, value in raw:
        lower = key.lower()
        if (lower == b"authorization" and value[:7].lower() == b"bearer " and value[7:].strip()) or (
            lower == b"x-api-key" and value.strip()
        ):
            return True
    return False


def _recorded_as_json(request: RecordedRequest) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "json": request.json,
        "time": request.time,
    }


def create_mock_app(state: MockState | None = None) -> ASGIApp:
    """Create the mock provider ASGI app bound to ``state`` (a fresh :class:`MockState` if omitted).

    Usable directly with uvicorn, e.g. ``uvicorn --factory keel.testing:create_mock_app``.
    """
    st = state if state is not None else MockState()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _handle_http(st, scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    return app


async def _handle_http(st: MockState, scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    method: str = scope["method"]
    body = await _read_body(receive)

    if path.startswith("/_mock/"):
        await _handle_control(st, path, method, body, send)
        return

    req: Any = None
    bad_json = False
    if body:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            bad_json = True
    st.request_count += 1
    if st.record:
        query = scope.get("query_string", b"").decode("latin-1")
        st.record_request(
            RecordedRequest(method, path, query, _headers_dict(scope["headers"]), req, body, time.time())
        )

    route = _ROUTES.get(path)
    if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        route = ("GET", "model", False)
    if route is None:
        msg = f"Unknown request URL: {method} {path}. Please check the URL for typos."
        await _send_bytes(send, 404, _error_body(False, msg, "invalid_request_error", "unknown_url"))
        return
    route_method, handler, anthropic = route
    if method != route_method:
        msg = f"Method {method} not allowed for {path}"
        await _send_bytes(
            send, 405, _error_body(anthropic, msg, "invalid_request_error", "method_not_allowed")
        )
        return
    if handler == "health":
        await _send_bytes(send, 200, _HEALTH_BODY)
        return
    if st.require_auth and not _has_auth(scope["headers"]):
        etype = "authentication_error" if anthropic else "invalid_request_error"
        msg = "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'"
        await _send_bytes(send, 401, _error_body(anthropic, msg, etype, "invalid_api_key"))
        return

    if method == "POST":
        if bad_json or not isinstance(req, dict):
            msg = "We could not parse the JSON body of your request." if body else "Request body is empty."
            await _send_bytes(send, 400, _error_body(anthropic, msg, "invalid_request_error"))
            return
        model = req.get("model")
    else:
        model = None

    fault: Fault | None = None
    if isinstance(model, str) and model.startswith("fault:"):
        try:
            fault = parse_fault(model)
        except ValueError as exc:
            await _send_bytes(send, 400, _error_body(anthropic, str(exc), "invalid_request_error"))
            return
    else:
        fault = st.take_fault()

    stream = method == "POST" and req.get("stream") is True and handler in ("chat", "messages")
    if fault is not None:
        if await _apply_fault(fault, anthropic, stream, req, receive, send):
            return

    try:
        if handler == "chat":
            is_stream, payload = _chat_completion(st, req, fault)
        elif handler == "messages":
            is_stream, payload = _anthropic_message(st, req, fault)
        elif handler == "embeddings":
            is_stream, payload = False, _embeddings(st, req)
        elif handler == "count_tokens":
            is_stream, payload = False, _anthropic_count_tokens(req)
        elif handler == "model":
            is_stream, payload = False, _model_object(path[len("/v1/models/") :])
        else:  # models
            await _send_bytes(send, 200, _MODELS_BODY)
            return
    except _HTTPError as exc:
        etype = _ANTHROPIC_ERROR_TYPES.get(exc.status, exc.etype) if anthropic else exc.etype
        await _send_bytes(send, exc.status, _error_body(anthropic, exc.message, etype, exc.code))
        return
    if is_stream:
        await _send_sse(receive, send, payload, fault)
    else:
        await _send_bytes(send, 200, orjson.dumps(payload))


async def _apply_fault(
    fault: Fault, anthropic: bool, stream: bool, req: Any, receive: Receive, send: Send
) -> bool:
    """Apply ``fault``; returns True when the response has been fully handled."""
    kind = fault.kind
    if kind == "status":
        extra: list[tuple[bytes, bytes]] = []
        if fault.retry_after is not None:
            extra.append((b"retry-after", f"{fault.retry_after:g}".encode()))
        await _send_bytes(send, fault.status, _status_fault_body(anthropic, fault.status), extra=extra)
        return True
    if kind == "context":
        if anthropic:
            body = _error_body(
                True, "prompt is too long: 250000 tokens > 200000 maximum", "invalid_request_error"
            )
        else:
            msg = (
                "This model's maximum context length is 128000 tokens. However, your messages resulted in "
                "250000 tokens. Please reduce the length of the messages."
            )
            body = _error_body(False, msg, "invalid_request_error", "context_length_exceeded", "messages")
        await _send_bytes(send, 400, body)
        return True
    if kind == "slow":
        await asyncio.sleep(fault.seconds)
        return False
    if kind == "reset" or (kind == "cut" and not stream):
        await _drop_connection(receive, send, reset=True, started=False)
        return True
    if kind == "empty":
        await _send_bytes(send, 200, b"", _SSE_HEADERS if stream else _JSON_HEADERS)
        return True
    if kind == "badjson" and not stream:
        bad = b'{"id": "msg_x", "type": "message", "content": [' if anthropic else b'{"id": "x", "choices": ['
        await _send_bytes(send, 200, bad)
        return True
    return False  # drip, cut (stream) and badjson (stream) are handled while streaming


async def _handle_control(st: MockState, path: str, method: str, body: bytes, send: Send) -> None:
    try:
        req: Any = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        req = None
    if path == "/_mock/requests" and method == "GET":
        await _send_bytes(send, 200, orjson.dumps([_recorded_as_json(r) for r in st.requests]))
    elif path == "/_mock/reset" and method == "POST":
        st.reset()
        await _send_bytes(send, 200, b'{"ok":true}')
    elif path == "/_mock/fault" and method == "POST" and isinstance(req, dict):
        try:
            st.set_fault(req.get("fault"), req.get("times"))
        except (ValueError, TypeError) as exc:
            await _send_bytes(send, 400, _error_body(False, str(exc), "invalid_request_error"))
            return
        await _send_bytes(send, 200, orjson.dumps({"fault": req.get("fault"), "times": req.get("times")}))
    elif path == "/_mock/script" and method == "POST" and isinstance(req, dict):
        replies = req.get("replies")
        if not isinstance(req.get("id"), str) or not isinstance(replies, list):
            await _send_bytes(
                send,
                400,
                _error_body(
                    False, "'id' (string) and 'replies' (array) are required", "invalid_request_error"
                ),
            )
            return
        st.script(req["id"], [r if isinstance(r, str) else orjson.dumps(r).decode() for r in replies])
        await _send_bytes(send, 200, orjson.dumps({"id": req["id"], "queued": len(replies)}))
    else:
        await _send_bytes(
            send, 404, _error_body(False, f"Unknown control route {method} {path}", "invalid_request_error")
        )


# --------------------------------------------------------------------------------------------------
# In-process server
# --------------------------------------------------------------------------------------------------


class _QuietConfig(uvicorn.Config):
    """A uvicorn config that leaves the process-wide logging configuration alone."""

    def configure_logging(self) -> None:
        return None


def _bind(host: str, port: int) -> socket.socket:
    family, socktype, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


class MockProvider:
    """A mock OpenAI/Anthropic-compatible HTTP server running uvicorn in a background thread.

    ``port=0`` picks a free port.  ``record=False`` disables request recording (``requests`` stays
    empty); at most ``max_recorded`` requests are kept.  ``require_auth=True`` answers 401 when neither
    ``Authorization: Bearer ...`` nor ``x-api-key`` is sent (by default any or no key is accepted).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        reply: str | None = None,
        embedding_dim: int = 8,
        *,
        record: bool = True,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        require_auth: bool = False,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.state = MockState(
            reply, embedding_dim, record=record, max_recorded=max_recorded, require_auth=require_auth
        )
        self.app: ASGIApp = create_mock_app(self.state)
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MockProvider:
        """Start the server in a background thread and wait until it accepts connections."""
        if self._thread is not None and self._thread.is_alive():
            return self
        sock = _bind(self.host, self._requested_port)
        self._port = sock.getsockname()[1]
        config = _QuietConfig(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server, self._error = server, None

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported by start()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"keel-mock-provider:{self._port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mock provider failed to start on {self.host}:{self._port}: {self._error!r}"
                )
            time.sleep(0.002)
        return self

    def stop(self) -> None:
        """Stop the server (in-flight requests get about a second to finish) and join its thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=3.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5.0)
        self._server = self._thread = None

    def __enter__(self) -> MockProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound TCP port (only known once started)."""
        if self._port is None:
            raise RuntimeError("MockProvider is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (use as ``base_url`` for the Anthropic SDK)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``url + "/v1"`` (use as ``base_url`` for the OpenAI SDK)."""
        return self.url + "/v1"

    # -- state -------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A thread-safe snapshot of the recorded requests, oldest first."""
        return self.state.requests

    @property
    def last_request(self) -> RecordedRequest | None:
        """The most recently recorded request, if any."""
        requests = self.state.requests
        return requests[-1] if requests else None

    @property
    def reply(self) -> str | None:
        """Fixed reply text (``None`` = ``"Mock reply to: <last user message>"``)."""
        return self.state.reply

    @reply.setter
    def reply(self, value: str | None) -> None:
        self.state.reply = value

    def reset(self) -> None:
        """Clear the recorded requests and the server-wide fault."""
        self.state.reset()

    def script(self, script_id: str, replies: Sequence[str] | Callable[[dict[str, Any]], str] | None) -> None:
        """Script what model ``script:<script_id>`` answers: a queue of texts (one per request), a
        function ``(request body) -> text``, or ``None`` to forget the script."""
        self.state.script(script_id, replies)

    def set_fault(self, fault: str | None, times: int | None = None) -> None:
        """Make the server misbehave: ``"500"``, ``"429:2"``, ``"slow:0.5"``, ``"reset"``, ``"cut:3"``...

        ``None`` clears the fault; ``times=N`` applies it to the next N ``/v1/*`` requests only.
        """
        self.state.set_fault(fault, times)


# --------------------------------------------------------------------------------------------------
# pytest fixture (lazy: importing keel.testing never imports pytest)
# --------------------------------------------------------------------------------------------------


def _mock_provider_fixture() -> Iterator[MockProvider]:
    """Yield a started :class:`MockProvider`; stop it afterwards."""
    with MockProvider() as mock:
        yield mock


_fixture: Any = None

# Declared for type checkers / linters only: no value is bound, so the module ``__getattr__`` below builds
# the fixture on first access (that is where pytest gets imported).
mock_provider: Any


def __getattr__(name: str) -> Any:
    """Build the ``mock_provider`` pytest fixture on first access (imports pytest lazily)."""
    global _fixture
    if name == "mock_provider":
        if _fixture is None:
            try:
                import pytest
            except ImportError:  # no pytest: expose the plain generator function
                _fixture = _mock_provider_fixture
            else:
                _fixture = pytest.fixture(name="mock_provider")(_mock_provider_fixture)
        return _fixture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "mock_provider"})


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _cli_app() -> ASGIApp:
    """App factory for ``python -m keel.testing`` (configured through ``KEEL_MOCK_*`` variables)."""
    return create_mock_app(
        MockState(
            os.environ.get("KEEL_MOCK_REPLY") or None,
            int(os.environ.get("KEEL_MOCK_EMBEDDING_DIM", "8")),
            record=os.environ.get("KEEL_MOCK_RECORD") == "1",
            require_auth=os.environ.get("KEEL_MOCK_REQUIRE_AUTH") == "1",
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the mock provider in the foreground (``python -m keel.testing --port 9100 --workers 4``)."""
    parser = argparse.ArgumentParser(prog="python -m keel.testing", description="keel mock LLM provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reply", default=None, help="fixed reply text")
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="record requests (GET /_mock/requests)")
    parser.add_argument("--require-auth", action="store_true", help="401 when no API key is sent")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    os.environ["KEEL_MOCK_REPLY"] = args.reply or ""
    os.environ["KEEL_MOCK_EMBEDDING_DIM"] = str(args.embedding_dim)
    os.environ["KEEL_MOCK_RECORD"] = "1" if args.record else "0"
    os.environ["KEEL_MOCK_REQUIRE_AUTH"] = "1" if args.require_auth else "0"

    def available(module: str) -> bool:
        try:
            __import__(module)
        except ImportError:
            return False
        return True

    print(
        f"keel mock provider on http://{args.host}:{args.port} (workers={args.workers}, record={args.record})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        "keel.testing:_cli_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop" if available("uvloop") else "asyncio",
        http="httptools" if available("httptools") else "h11",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
