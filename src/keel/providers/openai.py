"""OpenAI and any OpenAI-compatible upstream (vLLM, llama.cpp server, Ollama, the mock provider)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from keel.config import ModelConfig, Settings
from keel.errors import UpstreamError
from keel.plugins import hookimpl
from keel.providers.base import HTTPProvider, SSEParser, connection_error
from keel.types import ChatResult, Usage

__all__ = ["OpenAIProvider", "OpenAIStream", "usage_from_openai"]


def usage_from_openai(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    details = u.get("prompt_tokens_details") or {}
    cdetails = u.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=u.get("prompt_tokens"),
        output_tokens=u.get("completion_tokens"),
        cached_input_tokens=details.get("cached_tokens") if isinstance(details, dict) else None,
        reasoning_tokens=cdetails.get("reasoning_tokens") if isinstance(cdetails, dict) else None,
    )


class OpenAIStream:
    """Forwards an upstream OpenAI SSE stream event by event, learning usage and output as it goes."""

    def __init__(self, resp: aiohttp.ClientResponse, label: str, client_wants_usage: bool) -> None:
        self._resp = resp
        self._label = label
        self._client_wants_usage = client_wants_usage
        self.usage = Usage()
        self.output_text = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.served_model: str | None = None
        self.first_byte_at: float | None = None

    def _learn(self, chunk: dict[str, Any]) -> bool:
        """Update state from one chunk; return False when the chunk must not be forwarded."""
        if self.served_model is None and chunk.get("model"):
            self.served_model = chunk["model"]
        choices = chunk.get("choices") or []
        for ch in choices:
            delta = ch.get("delta") or {}
            content = delta.get("content")
            if content:
                self.output_text += content
            for tc in delta.get("tool_calls") or ():
                idx = tc.get("index", 0)
                while len(self.tool_calls) <= idx:
                    self.tool_calls.append(
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                slot = self.tool_calls[idx]
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"] += fn["arguments"]
            if ch.get("finish_reason"):
                self.finish_reason = ch["finish_reason"]
        if chunk.get("usage"):
            self.usage = usage_from_openai(chunk["usage"])
            if not choices and not self._client_wants_usage:
                return False
        return True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        parser = SSEParser()
        done = False
        try:
            async for data in self._resp.content.iter_any():
                if self.first_byte_at is None:
                    self.first_byte_at = time.perf_counter()
                for event in parser.feed(data):
                    _, payload = SSEParser.fields(event)
                    if payload == b"[DONE]":
                        done = True
                        yield b"data: [DONE]\n\n"
                        continue
                    if not payload:
                        continue
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        raise UpstreamError(
                            f"upstream {self._label} sent a malformed stream event",
                            code="upstream_bad_response",
                        ) from None
                    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                        raise UpstreamError(f"upstream {self._label} stream error: {chunk['error']}")
                    if self._learn(chunk):
                        yield b"data: " + payload + b"\n\n"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_error(exc, self._label) from None
        finally:
            self._resp.release()
        if not done:
            raise UpstreamError(
                f"upstream {self._label} stream ended before completion", code="upstream_stream_cut"
            )


class OpenAIProvider(HTTPProvider):
    """Chat completions against `{api_base}/chat/completions`."""

    name = "openai"
    default_api_base = "https://api.openai.com/v1"

    def __init__(self, deployment: ModelConfig, settings: Settings) -> None:
        super().__init__(deployment, settings)
        self.url = self.api_base + "/chat/completions"
        self.embeddings_url = self.api_base + "/embeddings"
        self._headers = {"content-type": "application/json", "accept-encoding": "gzip"}
        if deployment.api_key:
            self._headers["authorization"] = f"Bearer {deployment.api_key}"

    def _payload(self, body: dict[str, Any], stream: bool) -> bytes:
        out = dict(body)
        out["model"] = self.deployment.upstream_model
        if stream:
            # always ask for usage, so every stream is costed; stripped again if the client did not ask
            opts = dict(out.get("stream_options") or {})
            opts["include_usage"] = True
            out["stream_options"] = opts
        return orjson.dumps(out)

    async def chat(self, body: dict[str, Any], headers: dict[str, str]) -> ChatResult:
        data, raw = await self.post_json(self.url, self._payload(body, False), headers)
        if not isinstance(data.get("choices"), list):
            raise UpstreamError(
                f"upstream {self.label} returned an unexpected body", code="upstream_bad_response"
            )
        return ChatResult(
            body=data,
            usage=usage_from_openai(data.get("usage")),
            served_model=data.get("model") or "",
            raw=raw,
        )

    async def chat_stream(self, body: dict[str, Any], headers: dict[str, str]) -> OpenAIStream:
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = await self.open_stream(self.url, self._payload(body, True), headers)
        return OpenAIStream(resp, self.label, wants_usage)

    async def embeddings(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        payload = orjson.dumps({**body, "model": self.deployment.upstream_model})
        data, _ = await self.post_json(self.embeddings_url, payload, headers)
        return data


class OpenAICompatibleProvider(OpenAIProvider):
    name = "openai-compatible"

    def __init__(self, deployment: ModelConfig, settings: Settings) -> None:
        if not deployment.api_base:
            from keel.errors import ConfigError

            raise ConfigError(
                f"models[{deployment.name}].api_base", "required for provider openai-compatible"
            )
        super().__init__(deployment, settings)


@hookimpl
def register_providers(register: Any) -> None:
    register("openai", OpenAIProvider)
    register("openai-compatible", OpenAICompatibleProvider)
