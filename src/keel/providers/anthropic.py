"""Anthropic upstream: OpenAI chat requests translated to the Messages API and back, streams included."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from keel.config import ModelConfig, Settings
from keel.errors import BadRequest, UpstreamError
from keel.plugins import hookimpl
from keel.providers.anthropic_format import (
    AnthropicToOpenAIStream,
    TranslationContext,
    TranslationError,
    UpstreamStreamError,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)
from keel.providers.base import HTTPProvider, SSEParser, connection_error
from keel.providers.openai import usage_from_openai
from keel.types import ChatResult, Usage

__all__ = ["AnthropicProvider"]

ANTHROPIC_VERSION = "2023-06-01"


class _AnthropicStream:
    def __init__(self, resp: aiohttp.ClientResponse, label: str, translator: AnthropicToOpenAIStream) -> None:
        self._resp = resp
        self._label = label
        self._t = translator
        self.usage = Usage()
        self.output_text = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.served_model: str | None = None

    def _sync(self) -> None:
        self.output_text = self._t.text
        self.tool_calls = self._t.tool_calls
        self.finish_reason = self._t.finish_reason
        self.usage = usage_from_openai(self._t.usage)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        parser = SSEParser()
        try:
            async for data in self._resp.content.iter_any():
                for event in parser.feed(data):
                    _, payload = SSEParser.fields(event)
                    if not payload:
                        continue
                    try:
                        ev = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        raise UpstreamError(
                            f"upstream {self._label} sent a malformed stream event",
                            code="upstream_bad_response",
                        ) from None
                    if self.served_model is None and ev.get("type") == "message_start":
                        self.served_model = (ev.get("message") or {}).get("model")
                    try:
                        chunks = self._t.feed(ev)
                    except UpstreamStreamError as exc:
                        raise UpstreamError(f"upstream {self._label} stream error: {exc.message}") from None
                    self._sync()
                    for ch in chunks:
                        yield b"data: " + orjson.dumps(ch) + b"\n\n"
                    if self._t.done:
                        yield b"data: [DONE]\n\n"
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_error(exc, self._label) from None
        finally:
            self._resp.release()
        raise UpstreamError(
            f"upstream {self._label} stream ended before completion", code="upstream_stream_cut"
        )


class AnthropicProvider(HTTPProvider):
    """Chat completions served by Anthropic's Messages API."""

    name = "anthropic"
    default_api_base = "https://api.anthropic.com"

    def __init__(self, deployment: ModelConfig, settings: Settings) -> None:
        super().__init__(deployment, settings)
        base = self.api_base
        self.url = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
        self._headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if deployment.api_key:
            self._headers["x-api-key"] = deployment.api_key
        self.default_max_tokens = deployment.max_tokens or 4096

    def _translate(self, body: dict[str, Any], stream: bool) -> tuple[bytes, TranslationContext]:
        try:
            req, ctx = openai_to_anthropic_request(
                body, self.deployment.upstream_model, self.default_max_tokens
            )
        except TranslationError as exc:
            raise BadRequest(str(exc), code="unsupported_for_provider") from None
        req["stream"] = stream
        return orjson.dumps(req), ctx

    async def chat(self, body: dict[str, Any], headers: dict[str, str]) -> ChatResult:
        payload, ctx = self._translate(body, False)
        data, _ = await self.post_json(self.url, payload, headers)
        try:
            out = anthropic_to_openai_response(data, body["model"], ctx)
        except (TranslationError, KeyError, TypeError, AttributeError):
            raise UpstreamError(
                f"upstream {self.label} returned a malformed response", code="upstream_bad_response"
            ) from None
        return ChatResult(
            body=out, usage=usage_from_openai(out.get("usage")), served_model=data.get("model") or ""
        )

    async def chat_stream(self, body: dict[str, Any], headers: dict[str, str]) -> _AnthropicStream:
        payload, ctx = self._translate(body, True)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = await self.open_stream(self.url, payload, headers)
        translator = AnthropicToOpenAIStream(
            body["model"], ctx, include_usage=wants_usage, created=int(time.time())
        )
        return _AnthropicStream(resp, self.label, translator)


@hookimpl
def register_providers(register: Any) -> None:
    register("anthropic", AnthropicProvider)
