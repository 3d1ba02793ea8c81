"""Response caching for chat completions: exact (a hash of the normalised request) and semantic (similarity).

Exact cache
    :func:`request_key` hashes what decides the answer: the model, the messages (trailing whitespace
    stripped, multi-part text joined) and every parameter except the few known not to change the
    answer (``user``, ``stream``, ``stream_options``, ``metadata``…). Unknown parameters are part of
    the key: a parameter we do not know about can only cause a miss, never a wrong answer. The key
    is prefixed by the scope (the project id), so projects never share entries. Backends:
    :class:`MemoryExactCache` (LRU + TTL, one process) and :class:`RedisExactCache` (shared).

Semantic cache
    :class:`SemanticCache` embeds the text of the last user turn (all-MiniLM-L6-v2 by default, or
    any injected object with the same ``embed`` coroutine) and serves the most similar cached answer
    whose *context* is identical: same scope, model, parameters and earlier messages
    (:func:`context_key`). So a paraphrased question hits, but never across a different system
    prompt, conversation history or model. Backends: :class:`MemorySemanticIndex` (a numpy matrix
    per context) and :class:`RedisSemanticIndex` (float32 vectors in a Redis hash per context,
    similarity computed here).

:class:`ResponseCache` puts them together in the order the gateway needs: the exact cache first,
and the embedder runs only when it misses. :func:`cacheable` decides from the request and its
headers whether to use the cache at all; :func:`stream_from_cached` replays a cached completion as
OpenAI server-sent events so streaming requests can be served from the cache too.

Sampling temperature is deliberately not a reason to bypass the cache: a client that sends
``temperature: 1`` still usually wants *an* answer, not a fresh draw each time; one that wants a
fresh draw sends ``cache-control: no-cache``. Tool-calling turns are not cached by default, since
their answers usually depend on state outside the request (``cache_tool_calls=True`` to change it).

Cache failures never fail a request: a Redis error or an embedder error is logged and counted
(``errors``) and served as a miss. numpy (shipped with the ``embeddings`` extra) is needed by the
semantic cache only and imported lazily, as are redis and the local embedding model.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

if TYPE_CHECKING:
    import numpy as np
    from redis.asyncio import Redis

__all__ = [
    "DEFAULT_SEMANTIC_THRESHOLD",
    "EXCLUDED_PARAMS",
    "CacheHit",
    "CachedResponse",
    "Embedder",
    "ExactCache",
    "MemoryExactCache",
    "MemorySemanticIndex",
    "RedisExactCache",
    "RedisSemanticIndex",
    "ResponseCache",
    "SemanticCache",
    "SemanticIndex",
    "cacheable",
    "context_key",
    "request_key",
    "semantic_text",
    "storable",
    "stream_from_cached",
]

log = logging.getLogger("keel.cache")

DEFAULT_SEMANTIC_THRESHOLD = 0.92

# Request fields that do not change the answer: who asks, how it is delivered, what is logged.
EXCLUDED_PARAMS = frozenset(
    {
        "user",
        "stream",
        "stream_options",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_MAX_TOKENS = ("max_completion_tokens", "max_tokens")  # the same limit under its new and old name
_STORABLE_FINISH = frozenset({"stop", "length", "tool_calls", "function_call"})


# ---------------------------------------------------------------------------------------------------
# Keys


def _is_text_part(part: Any) -> bool:
    return isinstance(part, str) or (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _part_text(part: Any) -> str:
    return part if isinstance(part, str) else str(part["text"])


def _norm_content(content: Any) -> Any:
    """Text with trailing whitespace stripped; all-text part lists joined into one string."""
    if isinstance(content, str):
        return content.rstrip()
    if isinstance(content, list):
        if all(_is_text_part(p) for p in content):
            # joined without a separator, as the providers join them for the model
            return "".join(_part_text(p) for p in content).rstrip()
        return [
            {**p, "text": p["text"].rstrip()} if isinstance(p, dict) and _is_text_part(p) else p
            for p in content
        ]
    return content


def _norm_message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}  # an explicit null is the default
    if "content" in out:
        out["content"] = _norm_content(out["content"])
    return out


def _normalise(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request reduced to what decides the answer, in one canonical form."""
    out: dict[str, Any] = {
        k: v for k, v in body.items() if v is not None and k not in EXCLUDED_PARAMS and k not in _MAX_TOKENS
    }
    limit = next((body[k] for k in _MAX_TOKENS if body.get(k) is not None), None)
    if limit is not None:
        out["max_completion_tokens"] = limit
    messages = body.get("messages")
    out["messages"] = [_norm_message(m) for m in messages] if isinstance(messages, list) else messages
    for name in _FLOAT_PARAMS:  # 1 and 1.0 are the same temperature
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if out.get("n") == 1:
        del out["n"]
    bias = out.get("logit_bias")
    if isinstance(bias, dict):
        out["logit_bias"] = {
            str(k): float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in bias.items()
        }
    return out


def _digest(obj: Any) -> str:
    data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return hashlib.sha256(data).hexdigest()


def _check_scope(scope: str) -> None:
    if not isinstance(scope, str) or not scope:
        raise ValueError("cache scope must be a non-empty string (the project id)")


def request_key(body: Mapping[str, Any], scope: str) -> str:
    """The exact-cache key of an OpenAI chat-completions request: ``"{scope}:{sha256 hex}"``.

    Equal for requests that differ only in key order, trailing whitespace of message text, text
    split into parts, excluded parameters (:data:`EXCLUDED_PARAMS`), ``max_tokens`` versus
    ``max_completion_tokens``, ``stop: "x"`` versus ``["x"]``, ``1`` versus ``1.0``, ``n: 1``
    versus no ``n``, and explicit nulls versus absent fields.
    """
    _check_scope(scope)
    return f"{scope}:{_digest(_normalise(body))}"


def semantic_text(body: Mapping[str, Any]) -> str | None:
    """The text the semantic cache compares: the final message when it is a text-only user turn, else None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = _norm_content(last.get("content"))
    if not isinstance(content, str):  # images, audio or files: the text alone does not say what was asked
        return None
    return content.strip() or None


def context_key(body: Mapping[str, Any], scope: str) -> str:
    """Hash of everything but the last user turn's content (model, parameters, earlier messages), scoped.

    Semantic matches are only searched among entries with the same context key.
    """
    _check_scope(scope)
    norm = _normalise(body)
    messages = norm.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        norm["messages"] = [*messages[:-1], {k: v for k, v in messages[-1].items() if k != "content"}]
    norm["__keel_context__"] = 1  # never equal to an exact request's hash
    return f"{scope}:{_digest(norm)}"


def _header_items(headers: Any) -> Iterable[tuple[str, str]]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    for k, v in items:
        name = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        value = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        yield name.lower(), value


def cacheable(
    body: Mapping[str, Any],
    headers: Mapping[str, str] | Iterable[tuple[bytes | str, bytes | str]] | None = None,
    *,
    cache_tool_calls: bool = False,
) -> tuple[bool, str]:
    """Whether the cache may serve (and store) this request: ``(True, "")`` or ``(False, reason)``.

    ``headers`` is a mapping or the ASGI list of ``(name, value)`` byte pairs. Not cacheable:
    ``cache-control: no-cache`` or ``no-store``, ``x-keel-cache: no-cache`` (or ``no-store``,
    ``off``, ``bypass``), ``n`` above 1, a request without messages, and, unless
    ``cache_tool_calls``, a tool-calling turn (``tools``/``functions`` given, or the last message
    is a tool result). Any temperature is cacheable (see the module docstring).
    """
    for name, value in _header_items(headers or ()):
        if name == "cache-control":
            directives = {d.split("=", 1)[0].strip().lower() for d in value.split(",")}
            for directive in ("no-store", "no-cache"):
                if directive in directives:
                    return False, f"cache-control: {directive}"
        elif name == "x-keel-cache":
            mode = value.strip().lower()
            if mode in ("no-cache", "no-store", "off", "bypass"):
                return False, f"x-keel-cache: {mode}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return False, "no messages"
    n = body.get("n")
    if n is not None and n != 1:
        return False, f"n={n}: several samples are asked for"
    if not cache_tool_calls:
        if body.get("tools") or body.get("functions"):
            return False, "tool-calling request"
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") in ("tool", "function"):
            return False, "tool result turn"
    return True, ""


# ---------------------------------------------------------------------------------------------------
# Cached values


@dataclass(slots=True)
class CachedResponse:
    """A cached chat completion.

    ``cost_usd`` is what the original upstream call cost, which is what a hit saves. ``usage`` is the
    original call's usage; ``created_at`` is epoch seconds.
    """

    body: dict[str, Any]
    model: str
    usage: dict[str, Any] = field(default_factory=dict)
    cost_usd: float | None = None
    created_at: float = field(default_factory=time.time)

    @classmethod
    def from_completion(cls, body: dict[str, Any], cost_usd: float | None = None) -> CachedResponse:
        """Wrap an OpenAI ``chat.completion`` body (model and usage are read from it)."""
        return cls(
            body=body,
            model=str(body.get("model") or ""),
            usage=dict(body.get("usage") or {}),
            cost_usd=cost_usd,
        )

    @property
    def age_s(self) -> float:
        """Seconds since the original answer was produced (for an ``age`` response header)."""
        return max(0.0, time.time() - self.created_at)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "body": self.body,
                "model": self.model,
                "usage": self.usage,
                "cost_usd": self.cost_usd,
                "created_at": self.created_at,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> CachedResponse:
        d = orjson.loads(data)
        return cls(
            body=d["body"],
            model=d["model"],
            usage=d.get("usage") or {},
            cost_usd=d.get("cost_usd"),
            created_at=float(d.get("created_at") or 0.0),
        )


def storable(completion: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether an upstream ``chat.completion`` is worth caching: ``(True, "")`` or ``(False, reason)``.

    Every choice must carry a message and have finished normally (``stop``, ``length`` or a tool
    call); a ``content_filter`` stop or a missing finish reason is not cached.
    """
    if completion.get("object") not in (None, "chat.completion"):
        return False, f"not a chat completion: {completion.get('object')!r}"
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        return False, "no choices"
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return False, "a choice has no message"
        if choice.get("finish_reason") not in _STORABLE_FINISH:
            return False, f"finish_reason {choice.get('finish_reason')!r}"
    return True, ""


def stream_from_cached(
    resp: CachedResponse, *, include_usage: bool = False, chunk_chars: int = 48
) -> list[bytes]:
    """Server-sent events (``data: {chunk}\\n\\n`` … ``data: [DONE]\\n\\n``) replaying a cached completion.

    Per choice: a role chunk, the content in pieces of ``chunk_chars`` characters, a refusal,
    each tool call whole (id, name, arguments), then the chunk with the finish reason. With
    ``include_usage`` (the request's ``stream_options.include_usage``) every chunk carries
    ``usage: null`` and a final ``choices: []`` chunk carries the original usage, as OpenAI does.
    Logprobs are not replayed.
    """
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be at least 1")
    body = resp.body
    completion_id = body.get("id") or "chatcmpl-cached"
    created = int(body.get("created") or resp.created_at)
    model = body.get("model") or resp.model
    fingerprint = body.get("system_fingerprint")

    def event(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if fingerprint:
            chunk["system_fingerprint"] = fingerprint
        if include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    out: list[bytes] = []
    for position, choice in enumerate(body.get("choices") or []):
        index = choice.get("index", position)
        message = choice.get("message") or {}

        def delta(d: dict[str, Any], finish_reason: str | None = None, index: int = index) -> bytes:
            return event([{"index": index, "delta": d, "finish_reason": finish_reason, "logprobs": None}])

        content = message.get("content")
        if isinstance(content, list):  # some providers answer in text parts
            content = "".join(_part_text(p) for p in content if _is_text_part(p))
        text = content if isinstance(content, str) else ""
        out.append(delta({"role": message.get("role") or "assistant", "content": "" if text else None}))
        for start in range(0, len(text), chunk_chars):
            out.append(delta({"content": text[start : start + chunk_chars]}))
        if isinstance(message.get("refusal"), str) and message["refusal"]:
            out.append(delta({"refusal": message["refusal"]}))
        for i, call in enumerate(message.get("tool_calls") or []):
            fn = call.get("function") or {}
            tool_call = {
                "index": i,
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""},
            }
            out.append(delta({"tool_calls": [tool_call]}))
        if message.get("function_call"):
            out.append(delta({"function_call": message["function_call"]}))
        out.append(delta({}, choice.get("finish_reason") or "stop"))
    if include_usage:
        out.append(event([], resp.usage or body.get("usage")))
    out.append(b"data: [DONE]\n\n")
    return out


# ---------------------------------------------------------------------------------------------------
# Exact cache


class ExactCache(Protocol):
    """Cached responses by :func:`request_key`."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, value: CachedResponse, ttl_s: float) -> None: ...


class MemoryExactCache:
    """In-process exact cache: LRU bounded to ``max_entries``, each entry expiring after its TTL.

    Values are stored serialised, so a caller mutating a returned body never changes the cache.
    Methods never await, so each runs atomically on the event loop: no lock is needed.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires, value)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return CachedResponse.from_json(entry[1])

    async def set(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        self._entries[key] = (time.monotonic() + ttl_s, value.to_json())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def clear(self) -> None:
        self._entries.clear()


class _RedisBacked:
    """A Redis client given, or made from a URL (then owned: :meth:`aclose` closes it); errors counted."""

    _LOG_EVERY_S = 10.0  # a Redis outage would otherwise log once per request

    def __init__(self, redis: str | Redis, timeout_s: float) -> None:
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            # short timeouts: a slow cache must not hold requests longer than the upstream call would
            # typed Any: redis-py's stubs type hash commands as sync-or-async unions
            self.redis: Any = aioredis.from_url(
                redis, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            self._owned = True
        else:
            kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {})
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "the Redis client for the cache must not use decode_responses (values are bytes)"
                )
            self.redis = redis
            self._owned = False
        self.errors = 0
        self._logged_at = float("-inf")

    async def ping(self) -> None:
        """Raise when Redis is unreachable (call it at start to fail fast on a misconfiguration)."""
        await self.redis.ping()

    async def aclose(self) -> None:
        if self._owned:
            await self.redis.aclose()

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= self._LOG_EVERY_S:
            self._logged_at = now
            log.warning("cache %s failed (%s: %s); serving as a miss", operation, type(exc).__name__, exc)


def _ttl_ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


class RedisExactCache(_RedisBacked):
    """Exact cache in Redis, shared by replicas: one string per entry (orjson), expiring with ``PX``.

    ``redis`` is a URL or a ``redis.asyncio.Redis`` client (without ``decode_responses``).
    Millisecond TTLs (``SET … PX``) rather than ``EX`` so fractional TTLs are honoured.
    """

    def __init__(self, redis: str | Redis, prefix: str = "keel:cache:", *, timeout_s: float = 1.0) -> None:
        super().__init__(redis, timeout_s)
        self.prefix = prefix

    async def get(self, key: str) -> CachedResponse | None:
        try:
            raw = await self.redis.get(self.prefix + key)
            return None if raw is None else CachedResponse.from_json(raw)
        except Exception as exc:  # Redis down or a corrupt value: a miss, never a failed request
            self._failed("get", exc)
            return None

    async def set(self, key: str, value: CachedResponse, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        try:
            await self.redis.set(self.prefix + key, value.to_json(), px=_ttl_ms(ttl_s))
        except Exception as exc:
            self._failed("set", exc)

    async def delete(self, key: str) -> None:
        try:
            await self.redis.delete(self.prefix + key)
        except Exception as exc:
            self._failed("delete", exc)


# ---------------------------------------------------------------------------------------------------
# Semantic cache


class Embedder(Protocol):
    """What the semantic cache needs of an embedding model (:class:`~keel.providers.local_embeddings.LocalEmbeddings` fits)."""

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]: ...


class SemanticIndex(Protocol):
    """Unit vectors and serialised answers, grouped by context (``context_key``)."""

    async def search(self, context: str, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        """The value of the most similar live entry with cosine similarity ≥ threshold, and the similarity."""
        ...

    async def add(self, context: str, entry_id: str, vector: np.ndarray, value: bytes, ttl_s: float) -> None:
        """Store (or replace, for the same ``entry_id``) an entry expiring after ``ttl_s``."""
        ...


class _Bucket:
    """The entries of one context: rows of a float32 matrix, grown by doubling, removed by swapping with the last."""

    __slots__ = ("expires", "ids", "rows", "values", "vectors")

    def __init__(self, dim: int) -> None:
        import numpy as np

        self.vectors = np.empty((4, dim), dtype=np.float32)
        self.expires = np.empty(4, dtype=np.float64)  # time.monotonic() deadlines
        self.ids: list[str] = []
        self.values: list[bytes] = []
        self.rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def put(self, entry_id: str, vector: np.ndarray, value: bytes, expires: float) -> bool:
        """Insert or replace; True when a new row was added."""
        import numpy as np

        row = self.rows.get(entry_id)
        added = row is None
        if row is None:
            row = len(self.ids)
            if row == len(self.vectors):
                self.vectors = np.concatenate([self.vectors, np.empty_like(self.vectors)])
                self.expires = np.concatenate([self.expires, np.empty_like(self.expires)])
            self.ids.append(entry_id)
            self.values.append(value)
            self.rows[entry_id] = row
        else:
            self.values[row] = value
        self.vectors[row] = vector
        self.expires[row] = expires
        return added

    def remove(self, row: int) -> None:
        last = len(self.ids) - 1
        gone = self.ids[row]
        if row != last:
            self.vectors[row] = self.vectors[last]
            self.expires[row] = self.expires[last]
            self.ids[row] = self.ids[last]
            self.values[row] = self.values[last]
            self.rows[self.ids[row]] = row
        self.ids.pop()
        self.values.pop()
        del self.rows[gone]

    def purge(self, now: float) -> int:
        """Drop expired rows; return how many."""
        import numpy as np

        expired = np.nonzero(self.expires[: len(self.ids)] <= now)[0]
        # highest rows first, so the row swapped in from the end is always a live one
        for row in expired[::-1]:
            self.remove(int(row))
        return len(expired)


class MemorySemanticIndex:
    """In-process semantic index: one numpy matrix per context, TTL per entry, ``max_entries`` in all.

    Over the bound, the entry closest to expiry in the least recently used context is evicted.
    Methods never await, so each runs atomically on the event loop.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    async def search(self, context: str, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        bucket = self._buckets.get(context)
        if bucket is None:
            return None
        self._count -= bucket.purge(time.monotonic())
        if not len(bucket):
            del self._buckets[context]
            return None
        self._buckets.move_to_end(context)
        if bucket.dim != vector.shape[0]:  # written with another embedding model
            return None
        sims = bucket.vectors[: len(bucket)] @ vector
        best = int(sims.argmax())
        similarity = float(sims[best])
        return (bucket.values[best], similarity) if similarity >= threshold else None

    async def add(self, context: str, entry_id: str, vector: np.ndarray, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        bucket = self._buckets.get(context)
        if bucket is None or bucket.dim != vector.shape[0]:
            if bucket is not None:
                self._count -= len(bucket)
            bucket = self._buckets[context] = _Bucket(int(vector.shape[0]))
        self._buckets.move_to_end(context)
        now = time.monotonic()
        self._count -= bucket.purge(now)
        if bucket.put(entry_id, vector, value, now + ttl_s):
            self._count += 1
        while self._count > self.max_entries:
            victim_context, victim = next(iter(self._buckets.items()))
            victim.remove(int(victim.expires[: len(victim)].argmin()))
            self._count -= 1
            if not len(victim):
                del self._buckets[victim_context]

    async def clear(self) -> None:
        self._buckets.clear()
        self._count = 0


# Adds an entry: its vector record to the context's hash, its value to its own key (native TTL). The
# hash lives as long as its longest-lived entry (PEXPIRE only ever extends it); past the bound a
# random other entry is evicted. Both keys share a hash tag, so this works on Redis Cluster too.
_ADD_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local max = tonumber(ARGV[5])
if max > 0 then
  local n = redis.call('HLEN', KEYS[1])
  while n > max do
    local victim = redis.call('HRANDFIELD', KEYS[1])
    if victim ~= ARGV[1] then
      redis.call('HDEL', KEYS[1], victim)
      redis.call('DEL', ARGV[6] .. victim)
      n = n - 1
    end
  end
end
return 1
"""
_EXPIRY = struct.Struct("<d")  # epoch deadline at the head of each vector record


class RedisSemanticIndex(_RedisBacked):
    """Semantic index in Redis, shared by replicas.

    Per context, a hash ``{prefix}{{context}}:v`` maps entry id -> (float64 epoch deadline, float32
    little-endian unit vector), and each answer is a string ``{prefix}{{context}}:r:{id}`` with its
    own TTL. A lookup reads the whole hash (about 1.5 KB per entry with 384 dimensions) and computes
    the similarities here with numpy: fine for thousands of entries per context (a few MB at most
    per lookup on a LAN). Beyond that, use a vector index in Redis itself, RediSearch
    (``FT.CREATE … VECTOR HNSW`` with ``FT.SEARCH … KNN``) or Redis 8 vector sets (``VSIM``), so only
    the nearest entries travel. Contexts hold at most ``max_entries_per_context`` entries (random
    eviction past it); expired records are removed lazily by the lookups that see them.
    """

    def __init__(
        self,
        redis: str | Redis,
        prefix: str = "keel:semcache:",
        *,
        max_entries_per_context: int = 5_000,
        candidates: int = 3,
        timeout_s: float = 1.0,
    ) -> None:
        super().__init__(redis, timeout_s)
        self.prefix = prefix
        self.max_entries_per_context = max_entries_per_context
        self.candidates = candidates  # answers tried, best first, when the best one's key has expired
        self._add = self.redis.register_script(_ADD_SCRIPT)

    def _vectors_key(self, context: str) -> str:
        return f"{self.prefix}{{{context}}}:v"

    def _value_prefix(self, context: str) -> str:
        return f"{self.prefix}{{{context}}}:r:"

    async def search(self, context: str, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        try:
            return await self._search(context, vector, threshold)
        except Exception as exc:
            self._failed("semantic search", exc)
            return None

    async def _search(self, context: str, vector: np.ndarray, threshold: float) -> tuple[bytes, float] | None:
        import numpy as np

        vectors_key = self._vectors_key(context)
        raw: dict[bytes, bytes] = await self.redis.hgetall(vectors_key)
        if not raw:
            return None
        dim = int(vector.shape[0])
        record = np.dtype([("expires", "<f8"), ("vector", "<f4", (dim,))])
        ids = [k for k, v in raw.items() if len(v) == record.itemsize]
        stale = [k for k, v in raw.items() if len(v) != record.itemsize]  # another embedding model's
        result: tuple[bytes, float] | None = None
        if ids:
            records = np.frombuffer(b"".join(raw[k] for k in ids), dtype=record)
            live = records["expires"] > time.time()
            stale += [ids[i] for i in np.nonzero(~live)[0]]
            sims = records["vector"] @ vector.astype(np.float32)
            sims[~live] = -np.inf
            for i in np.argsort(-sims)[: self.candidates]:
                similarity = float(sims[i])
                if similarity < threshold:
                    break
                value = await self.redis.get(self._value_prefix(context) + ids[i].decode())
                if value is not None:
                    result = (value, similarity)
                    break
                stale.append(ids[i])  # its answer expired or was evicted
        if stale:
            await self.redis.hdel(vectors_key, *stale)
        return result

    async def add(self, context: str, entry_id: str, vector: np.ndarray, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        record = _EXPIRY.pack(time.time() + ttl_s) + vector.astype("<f4").tobytes()
        value_prefix = self._value_prefix(context)
        try:
            await self._add(
                keys=[self._vectors_key(context), value_prefix + entry_id],
                args=[entry_id, record, value, _ttl_ms(ttl_s), self.max_entries_per_context, value_prefix],
            )
        except Exception as exc:
            self._failed("semantic add", exc)


class SemanticCache:
    """Answers for paraphrased questions: the last user turn embedded, matched within its context.

    ``index`` is a :class:`MemorySemanticIndex` or :class:`RedisSemanticIndex`; ``embedder``
    defaults to the local all-MiniLM-L6-v2 model (loaded on first use). Texts the model would
    truncate (over ``max_text_tokens`` tokens, or ``max_text_chars`` characters, checked before
    embedding) are not cached: two long prompts differing only after the cut would look identical.
    The last ``memo_size`` embeddings are remembered, so :meth:`set` after a missed :meth:`get`
    does not embed the same text again.
    """

    def __init__(
        self,
        index: SemanticIndex,
        embedder: Embedder | None = None,
        *,
        max_text_chars: int = 2_000,
        max_text_tokens: int = 256,
        memo_size: int = 256,
    ) -> None:
        self.index = index
        self._embedder = embedder
        self.max_text_chars = max_text_chars
        self.max_text_tokens = max_text_tokens  # all-MiniLM-L6-v2 reads 256 word pieces
        self.memo_size = memo_size
        self._memo: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self.errors = 0

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from keel.providers.local_embeddings import LocalEmbeddings

            self._embedder = LocalEmbeddings()
        return self._embedder

    async def _vector(self, text: str) -> np.ndarray | None:
        """The unit vector of ``text``, or None when it is too long to embed whole (or embedding failed)."""
        if text in self._memo:
            self._memo.move_to_end(text)
            return self._memo[text]
        if len(text) > self.max_text_chars:
            return None
        import numpy as np

        try:
            vectors, tokens = await self.embedder.embed([text])
        except Exception as exc:  # model missing or failing: serve as a miss, do not fail the request
            self.errors += 1
            log.warning("semantic cache: embedding failed (%s: %s)", type(exc).__name__, exc)
            return None
        raw = np.asarray(vectors[0], dtype=np.float32)
        norm = float(np.linalg.norm(raw))
        vector: np.ndarray | None = None
        if tokens <= self.max_text_tokens and norm > 0:
            # an injected embedder may not normalise; the indexes take dot products as cosines
            vector = raw if abs(norm - 1.0) <= 1e-4 else (raw / np.float32(norm)).astype(np.float32)
        self._memo[text] = vector
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return vector

    async def get(
        self, body: Mapping[str, Any], scope: str, threshold: float = DEFAULT_SEMANTIC_THRESHOLD
    ) -> tuple[CachedResponse, float] | None:
        """The cached answer most similar to this request's last user turn (≥ ``threshold``) and the similarity."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        text = semantic_text(body)
        if text is None:
            return None
        context = context_key(body, scope)
        vector = await self._vector(text)
        if vector is None:
            return None
        found = await self.index.search(context, vector, threshold)
        if found is None:
            return None
        try:
            return CachedResponse.from_json(found[0]), found[1]
        except Exception as exc:
            self.errors += 1
            log.warning("semantic cache: unreadable entry (%s)", exc)
            return None

    async def set(self, body: Mapping[str, Any], scope: str, value: CachedResponse, ttl_s: float) -> None:
        """Cache ``value`` as the answer to this request's last user turn in its context (same text replaces)."""
        text = semantic_text(body)
        if text is None or ttl_s <= 0:
            return
        context = context_key(body, scope)
        vector = await self._vector(text)
        if vector is None:
            return
        entry_id = hashlib.sha256(text.encode()).hexdigest()[:32]
        await self.index.add(context, entry_id, vector, value.to_json(), ttl_s)


# ---------------------------------------------------------------------------------------------------
# Both together


@dataclass(slots=True)
class CacheHit:
    """What :meth:`ResponseCache.lookup` found, and how."""

    response: CachedResponse
    kind: Literal["exact", "semantic"]
    similarity: float  # 1.0 for an exact hit


class ResponseCache:
    """The exact cache, then (only on an exact miss, and when a threshold is given) the semantic cache."""

    def __init__(self, exact: ExactCache, semantic: SemanticCache | None = None) -> None:
        self.exact = exact
        self.semantic = semantic
        self.exact_hits = 0
        self.semantic_hits = 0
        self.misses = 0

    async def lookup(
        self, body: Mapping[str, Any], scope: str, *, semantic_threshold: float | None = None
    ) -> CacheHit | None:
        """A cached answer for ``body``; call :func:`cacheable` first. No embedding on an exact hit."""
        cached = await self.exact.get(request_key(body, scope))
        if cached is not None:
            self.exact_hits += 1
            return CacheHit(cached, "exact", 1.0)
        if self.semantic is not None and semantic_threshold is not None:
            found = await self.semantic.get(body, scope, semantic_threshold)
            if found is not None:
                self.semantic_hits += 1
                return CacheHit(found[0], "semantic", found[1])
        self.misses += 1
        return None

    async def store(
        self,
        body: Mapping[str, Any],
        scope: str,
        value: CachedResponse,
        ttl_s: float,
        *,
        semantic: bool = True,
    ) -> None:
        """Cache an upstream answer (check :func:`storable` first) in the exact and the semantic cache."""
        await self.exact.set(request_key(body, scope), value, ttl_s)
        if semantic and self.semantic is not None:
            await self.semantic.set(body, scope, value, ttl_s)
