"""Minimal ASGI plumbing for the hot path: read a bounded body, send JSON, send errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from keel.errors import KeelError, PayloadTooLarge, anthropic_error_body, openai_error_body

__all__ = ["Receive", "Scope", "Send", "header", "read_body", "send_bytes", "send_error"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (``name`` lower-case bytes)."""
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def headers_dict(scope: Scope) -> dict[bytes, bytes]:
    return {k: v for k, v in scope["headers"]}


async def read_body(scope: Scope, receive: Receive, limit: int, cl: bytes | None = None) -> bytes:
    """Read the whole request body, refusing more than ``limit`` bytes with 413."""
    if cl is not None:
        try:
            if int(cl) > limit:
                raise PayloadTooLarge(f"request body of {int(cl)} bytes exceeds the limit of {limit} bytes")
        except ValueError:
            pass
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        body = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send, err: KeelError, headers: list[tuple[bytes, bytes]], dialect: str = "openai"
) -> None:
    """Send ``err`` in the caller's API shape (``openai`` or ``anthropic``)."""
    body = anthropic_error_body(err) if dialect == "anthropic" else openai_error_body(err)
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.status, body, headers + extra)
