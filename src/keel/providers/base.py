"""What every HTTP provider shares: one pooled aiohttp session, error mapping, SSE framing."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from keel.config import ModelConfig, Settings
from keel.errors import (
    BadRequest,
    KeelError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = [
    "HTTPProvider",
    "SSEParser",
    "connection_error",
    "error_from_status",
    "upstream_message",
]


def upstream_message(body: bytes) -> tuple[str, str | None]:
    """Best-effort (message, code) from an upstream error body in OpenAI or Anthropic shape."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", "replace").strip()
        return (text or "no error body"), None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code") or err.get("type")
            return str(err.get("message") or err.get("type") or "upstream error"), (
                str(code) if code else None
            )
        if isinstance(err, str):
            return err, None
        if "message" in data:
            return str(data["message"]), None
    return "upstream error", None


def error_from_status(status: int, body: bytes, headers: Any, deployment: str) -> KeelError:
    """Map an upstream HTTP error onto the gateway's error contract."""
    msg, code = upstream_message(body)
    where = f"upstream {deployment} returned {status}: {msg}"
    if status == 429:
        h = {"retry-after": headers["retry-after"]} if headers and "retry-after" in headers else {}
        return RateLimited(where, code="upstream_rate_limited", headers=h)
    if status in (401, 403):
        return UpstreamError(where, code="upstream_auth_error")
    if status == 408:
        return UpstreamTimeout(where)
    if 400 <= status < 500:
        return BadRequest(msg, code=code or "upstream_invalid_request")
    if status == 503:
        return UpstreamUnavailable(where)
    if status == 504:
        return UpstreamTimeout(where)
    return UpstreamError(where)


def connection_error(exc: BaseException, deployment: str) -> KeelError:
    """Map a transport failure onto 502/504."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream {deployment} timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"cannot connect to upstream {deployment}", code="upstream_connection_error")
    return UpstreamError(
        f"upstream {deployment} connection failed ({type(exc).__name__})", code="upstream_connection_error"
    )


class SSEParser:
    """Split a byte stream into SSE events (``\\n\\n`` or ``\\r\\n\\r\\n`` separated)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [p for p in parts if p.strip()]

    @property
    def pending(self) -> bytes:
        return self._buf

    @staticmethod
    def fields(event: bytes) -> tuple[str | None, bytes]:
        """Return (event type, data) of one SSE event."""
        etype: str | None = None
        data: list[bytes] = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif line.startswith(b"event:"):
                etype = line[6:].strip().decode()
        return etype, b"\n".join(data)


class HTTPProvider:
    """Base of providers that talk HTTP: one keep-alive connection pool per provider instance."""

    name = "http"
    default_api_base = ""

    def __init__(self, deployment: ModelConfig, settings: Settings) -> None:
        self.deployment = deployment
        self.settings = settings
        self.api_base = (deployment.api_base or self.default_api_base).rstrip("/")
        self.label = f"{deployment.name}/{deployment.provider}:{deployment.upstream_model}"
        total = deployment.timeout_s or settings.upstream_timeout_s
        connect = deployment.connect_timeout_s or settings.upstream_connect_timeout_s
        self.timeout = aiohttp.ClientTimeout(
            total=total, sock_connect=connect, sock_read=deployment.read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # created lazily: a session must be born inside the running event loop
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                skip_auto_headers=("User-Agent",),
                auto_decompress=True,
            )
        return self._session

    _headers: dict[str, str]

    async def post_json(
        self, url: str, payload: bytes, headers: dict[str, str]
    ) -> tuple[dict[str, Any], bytes]:
        """POST ``payload``; return the JSON object answered and its raw bytes. Failures are mapped."""
        try:
            async with self.session.post(url, data=payload, headers={**self._headers, **headers}) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise error_from_status(resp.status, raw, resp.headers, self.label)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_error(exc, self.label) from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError(
                f"upstream {self.label} returned malformed JSON", code="upstream_bad_response"
            ) from None
        if not isinstance(data, dict):
            raise UpstreamError(
                f"upstream {self.label} returned an unexpected body", code="upstream_bad_response"
            )
        return data, raw

    async def open_stream(self, url: str, payload: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST a streaming request; return the open response once it is known to be a 200 event stream."""
        try:
            resp = await self.session.post(url, data=payload, headers={**self._headers, **headers})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_error(exc, self.label) from None
        if resp.status != 200:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise connection_error(exc, self.label) from None
            finally:
                resp.release()
            raise error_from_status(resp.status, raw, resp.headers, self.label)
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            resp.release()
            raise UpstreamError(
                f"upstream {self.label} answered a stream request with {ctype or 'no content type'}",
                code="upstream_bad_response",
            )
        return resp

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
