"""The benchmark baseline: a minimal pass-through proxy for OpenAI chat completions.

This is the yardstick keel is measured against in ``bench/gateway.py``: the least work a Python
proxy can reasonably do per request with the same stack keel uses —

* a raw ASGI app (no framework) under uvicorn with ``loop="uvloop"``, ``http="httptools"`` and the
  access log off;
* one pooled ``aiohttp.ClientSession`` per worker (``TCPConnector(limit=0)``, keep-alive), created at
  lifespan startup and closed at shutdown;
* ``POST /v1/chat/completions``: read the body, parse it with orjson (a real proxy would at least look
  at the model: here it is rewritten to ``--upstream-model``), re-serialise it with orjson, POST it
  to the upstream with a fixed upstream key, and return the upstream's bytes, status and
  content-type;
* ``GET /health`` answers ``{"status":"ok"}`` (for readiness checks); anything else is a 404.

No auth, no validation, no tracing, no metrics: everything keel does on top of this is its overhead.

Usage::

    python bench/baseline_proxy.py --upstream http://127.0.0.1:9100 --port 9200 --workers 1

``--upstream`` is the upstream's base URL (without ``/v1``); requests go to
``<upstream>/v1/chat/completions``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENV_UPSTREAM = "KEEL_BENCH_PROXY_UPSTREAM"
ENV_UPSTREAM_MODEL = "KEEL_BENCH_PROXY_UPSTREAM_MODEL"
ENV_UPSTREAM_KEY = "KEEL_BENCH_PROXY_UPSTREAM_KEY"

_JSON = b"application/json"
_HEALTH = b'{"status":"ok"}'
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error"}}'
_BAD_REQUEST = b'{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}'
_BAD_GATEWAY = b'{"error":{"message":"upstream failed","type":"upstream_error"}}'


class PassThroughProxy:
    """Raw ASGI app forwarding ``POST /v1/chat/completions`` to one upstream."""

    def __init__(
        self, upstream: str, upstream_model: str | None = None, upstream_key: str = "sk-upstream"
    ) -> None:
        self.url = upstream.rstrip("/") + "/v1/chat/completions"
        self.upstream_model = upstream_model
        self.headers = {"content-type": "application/json", "authorization": f"Bearer {upstream_key}"}
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
                self.session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/v1/chat/completions" and scope["method"] == "POST":
            await self._chat(receive, send)
        elif path == "/health":
            await _respond(send, 200, _HEALTH, _JSON)
        else:
            await _respond(send, 404, _NOT_FOUND, _JSON)

    async def _chat(self, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _respond(send, 400, _BAD_REQUEST, _JSON)
            return
        if not isinstance(body, dict):
            await _respond(send, 400, _BAD_REQUEST, _JSON)
            return
        if self.upstream_model:
            body["model"] = self.upstream_model
        assert self.session is not None, "lifespan startup did not run"
        try:
            async with self.session.post(self.url, data=orjson.dumps(body), headers=self.headers) as resp:
                payload = await resp.read()
                status = resp.status
                ctype = resp.headers.get("content-type", "application/json").encode("latin-1")
        except (aiohttp.ClientError, TimeoutError):
            await _respond(send, 502, _BAD_GATEWAY, _JSON)
            return
        await _respond(send, status, payload, ctype)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def app_from_env() -> PassThroughProxy:
    """uvicorn factory (``--workers`` needs an import string): configuration comes from the environment."""
    return PassThroughProxy(
        os.environ[ENV_UPSTREAM],
        os.environ.get(ENV_UPSTREAM_MODEL) or None,
        os.environ.get(ENV_UPSTREAM_KEY, "sk-upstream"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Minimal pass-through proxy (the keel benchmark baseline).")
    parser.add_argument("--upstream", required=True, help="upstream base URL, e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--upstream-model", default="gpt-4o-mini", help="model name sent upstream ('' keeps the client's)"
    )
    parser.add_argument("--upstream-key", default="sk-upstream", help="API key sent upstream")
    args = parser.parse_args(argv)

    os.environ[ENV_UPSTREAM] = args.upstream
    os.environ[ENV_UPSTREAM_MODEL] = args.upstream_model
    os.environ[ENV_UPSTREAM_KEY] = args.upstream_key
    # make "baseline_proxy" importable by uvicorn (and by its spawned workers) however we were started
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    print(
        f"baseline proxy on http://{args.host}:{args.port} -> {args.upstream} (workers={args.workers})",
        flush=True,
    )
    uvicorn.run(
        "baseline_proxy:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
