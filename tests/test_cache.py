"""Response caching (keel.gateway.cache): request keys, cacheability, exact and semantic caches, stream replay.

Every cache test runs against the in-process backend and against the real Redis; when Redis is
unreachable the Redis leg FAILS (the session ``redis_url`` fixture), it is not skipped. The
semantic tests use the real all-MiniLM-L6-v2 model, loaded once for the module; a fake embedder
is only used for edge cases (call counting, failures, vectors chosen by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionChunk

from keel.gateway.cache import (
    CachedResponse,
    MemoryExactCache,
    MemorySemanticIndex,
    RedisExactCache,
    RedisSemanticIndex,
    ResponseCache,
    SemanticCache,
    cacheable,
    context_key,
    request_key,
    semantic_text,
    storable,
    stream_from_cached,
)
from keel.providers.local_embeddings import LocalEmbeddings

BACKENDS = ["memory", "redis"]
SYSTEM = {"role": "system", "content": "You are a concise geography assistant."}


def chat(
    question: str | list[dict], *, model: str = "gpt-4o-mini", system: dict[str, Any] = SYSTEM, **params: Any
) -> dict:
    return {"model": model, "messages": [system, {"role": "user", "content": question}], **params}


def completion(
    text: str | None = "Paris.", *, tool_calls: list[dict] | None = None, model: str = "gpt-4o-mini"
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "system_fingerprint": "fp_keel",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24},
    }


def cached(text: str | None = "Paris.", **kw: Any) -> CachedResponse:
    return CachedResponse.from_completion(completion(text, **kw), cost_usd=0.00042)


# ---------------------------------------------------------------------------------------------------
# fixtures


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client and a unique key prefix; every key under the prefix is deleted afterwards."""
    client = aioredis.from_url(url)
    await client.ping()
    prefix = f"keel:test:cache:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture(scope="module")
def minilm() -> LocalEmbeddings:
    emb = LocalEmbeddings()
    emb.load()
    return emb


@pytest.fixture(params=BACKENDS)
async def exact(request: pytest.FixtureRequest) -> AsyncIterator[MemoryExactCache | RedisExactCache]:
    if request.param == "memory":
        yield MemoryExactCache()
        return
    async with redis_client(request.getfixturevalue("redis_url")) as (client, prefix):
        yield RedisExactCache(client, prefix=prefix)


@pytest.fixture(params=BACKENDS)
async def index(request: pytest.FixtureRequest) -> AsyncIterator[MemorySemanticIndex | RedisSemanticIndex]:
    if request.param == "memory":
        yield MemorySemanticIndex()
        return
    async with redis_client(request.getfixturevalue("redis_url")) as (client, prefix):
        yield RedisSemanticIndex(client, prefix=prefix)


@pytest.fixture
async def redis_prefixed(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    async with redis_client(redis_url) as pair:
        yield pair


class FakeEmbedder:
    """Vectors chosen by hand (or a stable pseudo-random unit vector per text); records every call."""

    def __init__(self, vectors: dict[str, list[float]] | None = None, dim: int = 8) -> None:
        self.vectors = vectors or {}
        self.dim = dim
        self.calls: list[list[str]] = []
        self.fail = False
        self.tokens_per_text: int | None = None

    def vector(self, text: str) -> list[float]:
        if text in self.vectors:
            return self.vectors[text]
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return (v / np.linalg.norm(v)).tolist()

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        self.calls.append(list(texts))
        if self.fail:
            raise RuntimeError("embedding backend exploded")
        tokens = sum(self.tokens_per_text or len(t.split()) + 2 for t in texts)
        return [self.vector(t) for t in texts], tokens


def test_importing_the_module_loads_no_optional_dependency() -> None:
    # numpy comes with the embeddings extra only: the exact cache must work without it
    code = (
        "import sys, asyncio\n"
        "from keel.gateway.cache import MemoryExactCache, CachedResponse, request_key\n"
        "c = MemoryExactCache()\n"
        "asyncio.run(c.set(request_key({'model': 'm', 'messages': []}, 'p'), CachedResponse({}, 'm'), 5))\n"
        "print(sorted(m for m in ('numpy', 'redis', 'torch', 'sentence_transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------
# request keys


BASE = chat("What is the capital of France?", temperature=0.2, max_tokens=50)


def _reordered(body: dict) -> dict:
    return {
        k: ([dict(reversed(m.items())) for m in v] if k == "messages" else v)
        for k, v in reversed(body.items())
    }


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(_reordered(BASE), id="key-order"),
        pytest.param(
            chat("What is the capital of France?  \n\t", temperature=0.2, max_tokens=50), id="trailing-ws"
        ),
        pytest.param(
            chat(
                [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France? "}],
                temperature=0.2,
                max_tokens=50,
            ),
            id="text-parts",
        ),
        pytest.param({**BASE, "user": "u-42"}, id="user"),
        pytest.param({**BASE, "stream": True, "stream_options": {"include_usage": True}}, id="stream"),
        pytest.param({**BASE, "metadata": {"team": "geo"}, "store": True}, id="metadata"),
        pytest.param(
            {**{k: v for k, v in BASE.items() if k != "max_tokens"}, "max_completion_tokens": 50},
            id="max-tok",
        ),
        pytest.param({**BASE, "n": 1, "seed": None, "top_p": None}, id="defaults-and-nulls"),
        pytest.param(
            {**BASE, "messages": [{**SYSTEM, "name": None}, BASE["messages"][1]]}, id="null-message-field"
        ),
    ],
)
def test_key_ignores_what_does_not_change_the_answer(variant: dict) -> None:
    assert request_key(variant, "proj") == request_key(BASE, "proj")


def test_key_normalises_equivalent_parameter_spellings() -> None:
    assert request_key({**BASE, "stop": "\n"}, "p") == request_key({**BASE, "stop": ["\n"]}, "p")
    assert request_key({**BASE, "temperature": 1}, "p") == request_key({**BASE, "temperature": 1.0}, "p")
    assert request_key({**BASE, "logit_bias": {"50256": -100}}, "p") == request_key(
        {**BASE, "logit_bias": {"50256": -100.0}}, "p"
    )


TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"max_tokens": 10},
        {"max_completion_tokens": 10},
        {"stop": ["\n"]},
        {"tools": TOOLS},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"seed": 7},
        {"n": 2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logit_bias": {"50256": -100}},
        {"logprobs": True},
        {"reasoning_effort": "high"},  # a parameter the cache does not know: part of the key, to be safe
        {"messages": [SYSTEM, {"role": "user", "content": "What is the capital of Spain?"}]},
        {"messages": [{"role": "system", "content": "Answer in French."}, BASE["messages"][1]]},
        {"messages": [BASE["messages"][1]]},
        # leading whitespace is kept: only trailing whitespace is noise
        {"messages": [SYSTEM, {"role": "user", "content": "  What is the capital of France?"}]},
    ],
    ids=lambda c: next(iter(c)) + (":" + str(c[next(iter(c))])[:20] if "messages" in c else ""),
)
def test_key_changes_with_what_changes_the_answer(change: dict) -> None:
    assert request_key({**BASE, **change}, "proj") != request_key(BASE, "proj")


def test_key_is_scoped_sha256() -> None:
    a, b = request_key(BASE, "proj-a"), request_key(BASE, "proj-b")
    assert a.startswith("proj-a:") and b.startswith("proj-b:") and a != b
    digest = a.removeprefix("proj-a:")
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert b.removeprefix("proj-b:") == digest  # the scope is a prefix, the hash is the request's
    with pytest.raises(ValueError):
        request_key(BASE, "")


def test_context_key_ignores_only_the_last_user_turn() -> None:
    ctx = context_key(BASE, "p")
    assert context_key({**BASE, "messages": [SYSTEM, {"role": "user", "content": "Other?"}]}, "p") == ctx
    assert context_key({**BASE, "model": "gpt-4o"}, "p") != ctx
    assert context_key({**BASE, "temperature": 0.9}, "p") != ctx
    assert (
        context_key({**BASE, "messages": [{"role": "system", "content": "x"}, BASE["messages"][1]]}, "p")
        != ctx
    )
    assert context_key(BASE, "q") != ctx
    assert ctx != request_key(BASE, "p")
    assert semantic_text(BASE) == "What is the capital of France?"
    assert (
        semantic_text({**BASE, "messages": [*BASE["messages"], {"role": "assistant", "content": "x"}]})
        is None
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    multimodal = {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}
    assert semantic_text({**BASE, "messages": [multimodal]}) is None


# ---------------------------------------------------------------------------------------------------
# cacheable


@pytest.mark.parametrize(
    ("body", "headers", "ok", "reason"),
    [
        (BASE, {}, True, ""),
        (BASE, None, True, ""),
        ({**BASE, "temperature": 1.8, "stream": True}, {}, True, ""),  # any temperature, streaming too
        ({**BASE, "n": 1}, {}, True, ""),
        (BASE, {"Cache-Control": "no-cache"}, False, "cache-control: no-cache"),
        (BASE, {"cache-control": "max-age=0, No-Store"}, False, "cache-control: no-store"),
        (BASE, [(b"cache-control", b"no-cache")], False, "cache-control: no-cache"),  # ASGI raw headers
        (BASE, {"cache-control": "max-age=60"}, True, ""),
        (BASE, {"X-Keel-Cache": "no-cache"}, False, "x-keel-cache: no-cache"),
        (BASE, [(b"x-keel-cache", b"off")], False, "x-keel-cache: off"),
        ({**BASE, "n": 3}, {}, False, "n=3"),
        ({**BASE, "tools": TOOLS}, {}, False, "tool-calling"),
        (
            {
                **BASE,
                "messages": [
                    *BASE["messages"],
                    {"role": "assistant", "content": None, "tool_calls": []},
                    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
                ],
            },
            {},
            False,
            "tool result",
        ),
        ({"model": "m", "messages": []}, {}, False, "no messages"),
    ],
)
def test_cacheable(body: dict, headers: Any, ok: bool, reason: str) -> None:
    got_ok, got_reason = cacheable(body, headers)
    assert got_ok is ok
    assert got_reason.startswith(reason) if reason else got_reason == ""


def test_tool_calling_turns_are_cacheable_by_policy() -> None:
    assert cacheable({**BASE, "tools": TOOLS}, {}, cache_tool_calls=True) == (True, "")
    # the headers still win over the policy
    assert (
        cacheable({**BASE, "tools": TOOLS}, {"cache-control": "no-store"}, cache_tool_calls=True)[0] is False
    )


def test_storable() -> None:
    assert storable(completion()) == (True, "")
    assert storable(completion(tool_calls=[{"id": "c", "type": "function", "function": {}}]))[0] is True
    filtered = completion()
    filtered["choices"][0]["finish_reason"] = "content_filter"
    assert storable(filtered)[0] is False
    assert storable({**completion(), "choices": []})[0] is False


# ---------------------------------------------------------------------------------------------------
# exact cache


async def test_exact_roundtrip_and_miss(exact: Any) -> None:
    key = request_key(BASE, "proj")
    assert await exact.get(key) is None
    value = cached("Paris.")
    await exact.set(key, value, 60)
    got = await exact.get(key)
    assert got == value
    assert got.cost_usd == 0.00042 and got.usage["total_tokens"] == 24 and got.model == "gpt-4o-mini"
    got.body["choices"][0]["message"]["content"] = "mutated by a caller"
    assert (await exact.get(key)).body["choices"][0]["message"]["content"] == "Paris."
    assert await exact.get(request_key(BASE, "other-project")) is None
    await exact.set(key, cached("Paris, France."), 60)  # overwrite
    assert (await exact.get(key)).body["choices"][0]["message"]["content"] == "Paris, France."


async def test_exact_ttl_expiry(exact: Any) -> None:
    short, long = request_key(BASE, "p"), request_key({**BASE, "seed": 1}, "p")
    await exact.set(short, cached(), 0.3)
    await exact.set(long, cached(), 30)
    await exact.set(request_key({**BASE, "seed": 2}, "p"), cached(), 0)  # no TTL: not stored
    assert await exact.get(short) is not None
    await asyncio.sleep(0.5)
    assert await exact.get(short) is None
    assert await exact.get(long) is not None
    assert await exact.get(request_key({**BASE, "seed": 2}, "p")) is None


async def test_redis_exact_entries_expire_in_redis(redis_prefixed: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis_prefixed
    cache = RedisExactCache(client, prefix=prefix)
    key = request_key(BASE, "p")
    await cache.set(key, cached(), 20)
    assert 0 < await client.pttl(prefix + key) <= 20_000
    assert orjson.loads(await client.get(prefix + key))["cost_usd"] == 0.00042


async def test_memory_exact_lru_bound() -> None:
    cache = MemoryExactCache(max_entries=3)
    for k in "abc":
        await cache.set(k, cached(k), 60)
    assert await cache.get("a") is not None  # a is now the most recently used
    await cache.set("d", cached("d"), 60)
    assert len(cache) == 3
    assert await cache.get("b") is None  # least recently used, evicted
    assert [await cache.get(k) is not None for k in "acd"] == [True, True, True]


async def test_redis_unreachable_serves_misses() -> None:
    exact = RedisExactCache("redis://127.0.0.1:1/0", timeout_s=0.5)
    assert await exact.get("p:k") is None
    await exact.set("p:k", cached(), 60)
    assert exact.errors == 2
    with pytest.raises(Exception):  # noqa: B017 - the start-up check does raise
        await exact.ping()
    await exact.aclose()
    index = RedisSemanticIndex("redis://127.0.0.1:1/0", timeout_s=0.5)
    vec = np.ones(4, dtype=np.float32) / 2
    assert await index.search("p:c", vec, 0.5) is None
    await index.add("p:c", "id", vec, b"{}", 60)
    assert index.errors == 2
    await index.aclose()


async def test_redis_client_with_decoded_responses_is_refused(redis_url: str) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisExactCache(client)
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------------
# stream replay


def _parse_stream(events: list[bytes]) -> list[ChatCompletionChunk]:
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = []
    for ev in events[:-1]:
        assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and b"\n\n" not in ev[:-2]
        chunks.append(ChatCompletionChunk.model_validate(orjson.loads(ev[len(b"data: ") : -2])))
    return chunks


def _reassemble(chunks: list[ChatCompletionChunk]) -> tuple[str, list[dict], str | None]:
    text, finish = "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += (tc.function and tc.function.name) or ""
                call["arguments"] += (tc.function and tc.function.arguments) or ""
            finish = choice.finish_reason or finish
    return text, [calls[i] for i in sorted(calls)], finish


async def test_stream_replay_of_text(exact: Any) -> None:
    text = "Paris is the capital of France. 🇫🇷 Ça va? " * 5 + "Fin."
    await exact.set("p:k", cached(text), 60)
    resp = await exact.get("p:k")
    chunks = _parse_stream(stream_from_cached(resp))
    assert len(chunks) > 4  # role, several content pieces, finish
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == "chatcmpl-abc123" and c.model == "gpt-4o-mini" and c.usage is None for c in chunks)
    assert chunks[0].system_fingerprint == "fp_keel"
    assert _reassemble(chunks) == (text, [], "stop")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_replay_with_usage_and_tool_calls() -> None:
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
    ]
    resp = cached(None, tool_calls=calls)
    chunks = _parse_stream(stream_from_cached(resp, include_usage=True))
    text, got_calls, finish = _reassemble(chunks)
    assert text == "" and finish == "tool_calls"
    assert got_calls == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"id": "call_2", "name": "get_time", "arguments": '{"tz":"CET"}'},
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])


# ---------------------------------------------------------------------------------------------------
# semantic cache, with the real local MiniLM model


async def test_semantic_paraphrase_hits_and_unrelated_misses(index: Any, minilm: LocalEmbeddings) -> None:
    cache = SemanticCache(index, minilm)
    await cache.set(chat("What is the capital of France?"), "proj", cached("Paris."), 60)

    same = await cache.get(chat("What is the capital of France?"), "proj", 0.8)
    assert same is not None and same[1] == pytest.approx(1.0, abs=1e-4)

    found = await cache.get(chat("Tell me France's capital city."), "proj", threshold=0.8)
    assert found is not None, "paraphrase should hit at 0.8"
    response, similarity = found
    print(
        f"\n[{type(index).__name__}] similarity('What is the capital of France?', "
        f'"Tell me France\'s capital city.") = {similarity:.4f}'
    )
    assert 0.8 <= similarity < 0.999
    assert response.body["choices"][0]["message"]["content"] == "Paris."
    assert response.cost_usd == 0.00042
    # the default threshold (0.92) is stricter; the paraphrase scores about 0.90 with MiniLM
    assert await cache.get(chat("Tell me France's capital city."), "proj", threshold=0.95) is None

    for unrelated in ("How do I bake sourdough bread?", "What is the capital of Germany?"):
        assert await cache.get(chat(unrelated), "proj", threshold=0.8) is None, unrelated


async def test_semantic_context_and_scope_isolate(index: Any, minilm: LocalEmbeddings) -> None:
    cache = SemanticCache(index, minilm)
    await cache.set(chat("What is the capital of France?"), "proj", cached("Paris."), 60)
    paraphrase = "Tell me France's capital city."
    assert await cache.get(chat(paraphrase), "proj", 0.8) is not None
    assert await cache.get(chat(paraphrase, model="gpt-4o"), "proj", 0.8) is None
    other_system = {"role": "system", "content": "Answer like a pirate."}
    assert await cache.get(chat(paraphrase, system=other_system), "proj", 0.8) is None
    assert await cache.get(chat(paraphrase, temperature=0.9), "proj", 0.8) is None
    assert await cache.get(chat(paraphrase), "another-project", 0.8) is None
    # an identical question in another scope misses too
    assert await cache.get(chat("What is the capital of France?"), "another-project", 0.8) is None


async def test_semantic_ttl_expiry(index: Any, minilm: LocalEmbeddings) -> None:
    cache = SemanticCache(index, minilm)
    await cache.set(chat("What is the capital of France?"), "proj", cached("Paris."), 0.4)
    await cache.set(chat("How tall is the Eiffel Tower?"), "proj", cached("330 m."), 30)
    assert await cache.get(chat("Tell me France's capital city."), "proj", 0.8) is not None
    await asyncio.sleep(0.6)
    assert await cache.get(chat("Tell me France's capital city."), "proj", 0.8) is None
    hit = await cache.get(chat("What is the height of the Eiffel Tower?"), "proj", 0.8)
    assert hit is not None and hit[0].body["choices"][0]["message"]["content"] == "330 m."
    print(f"\n[{type(index).__name__}] similarity(Eiffel height paraphrase) = {hit[1]:.4f}")


async def test_response_cache_end_to_end(index: Any, exact: Any, minilm: LocalEmbeddings) -> None:
    rc = ResponseCache(exact, SemanticCache(index, minilm))
    question = chat("What is the capital of France?", temperature=0)
    assert await rc.lookup(question, "proj", semantic_threshold=0.8) is None
    await rc.store(question, "proj", cached("Paris."), 60)
    hit = await rc.lookup({**question, "stream": True, "user": "u"}, "proj", semantic_threshold=0.8)
    assert hit is not None and hit.kind == "exact" and hit.similarity == 1.0
    hit = await rc.lookup(
        chat("Which city is the capital of France?", temperature=0), "proj", semantic_threshold=0.8
    )
    assert hit is not None and hit.kind == "semantic" and 0.8 <= hit.similarity < 1
    text, _, _ = _reassemble(_parse_stream(stream_from_cached(hit.response)))
    assert text == "Paris."
    assert (rc.exact_hits, rc.semantic_hits, rc.misses) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# semantic cache edge cases, with a fake embedder


async def test_no_embedding_on_exact_hit_or_without_threshold() -> None:
    fake = FakeEmbedder()
    rc = ResponseCache(MemoryExactCache(), SemanticCache(MemorySemanticIndex(), fake))
    await rc.store(BASE, "p", cached(), 60)
    assert len(fake.calls) == 1  # the store embeds the question once
    fake.calls.clear()
    assert (await rc.lookup(BASE, "p", semantic_threshold=0.9)).kind == "exact"  # type: ignore[union-attr]
    assert fake.calls == []
    other = chat("Something else entirely?")
    assert await rc.lookup(other, "p") is None  # semantic not asked for
    assert fake.calls == []
    assert await rc.lookup(other, "p", semantic_threshold=0.9) is None
    assert fake.calls == [["Something else entirely?"]]


async def test_set_after_missed_get_embeds_once(index: Any) -> None:
    fake = FakeEmbedder()
    cache = SemanticCache(index, fake)
    assert await cache.get(BASE, "p", 0.9) is None
    await cache.set(BASE, "p", cached(), 60)
    assert fake.calls == [["What is the capital of France?"]]


async def test_what_is_not_embedded(index: Any) -> None:
    fake = FakeEmbedder()
    cache = SemanticCache(index, fake, max_text_chars=100)
    not_user_last = {**BASE, "messages": [*BASE["messages"], {"role": "assistant", "content": "Par"}]}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    multimodal = {
        **BASE,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}],
    }
    blank = chat("   ")
    too_long = chat("word " * 40)
    for body in (not_user_last, multimodal, blank, too_long):
        await cache.set(body, "p", cached(), 60)
        assert await cache.get(body, "p", 0.5) is None
    assert fake.calls == []
    with pytest.raises(ValueError):
        await cache.get(BASE, "p", 1.5)


async def test_texts_the_model_would_truncate_are_not_cached(index: Any) -> None:
    fake = FakeEmbedder()
    fake.tokens_per_text = 300  # over MiniLM's 256 word pieces: the vector would not cover the whole text
    cache = SemanticCache(index, fake)
    await cache.set(BASE, "p", cached(), 60)
    assert await cache.get(BASE, "p", 0.5) is None
    assert len(fake.calls) == 1  # embedded once; the verdict is remembered


async def test_vectors_are_normalised_and_same_text_replaces(index: Any) -> None:
    fake = FakeEmbedder({"a?": [3, 4, 0, 0], "b?": [6, 8, 0, 0], "c?": [0, 0, 1, 0]}, dim=4)
    cache = SemanticCache(index, fake)
    await cache.set(chat("a?"), "p", cached("first"), 60)
    await cache.set(chat("a?"), "p", cached("second"), 60)
    hit = await cache.get(chat("b?"), "p", 0.999)
    assert hit is not None and hit[1] == pytest.approx(1.0, abs=1e-6)
    assert hit[0].body["choices"][0]["message"]["content"] == "second"
    assert await cache.get(chat("c?"), "p", 0.1) is None  # orthogonal
    if isinstance(index, MemorySemanticIndex):
        assert len(index) == 1
    else:
        [vectors_key] = [k async for k in index.redis.scan_iter(match=index.prefix + "*:v")]
        assert await index.redis.hlen(vectors_key) == 1


async def test_embedder_failure_is_a_miss(index: Any) -> None:
    fake = FakeEmbedder()
    cache = SemanticCache(index, fake)
    await cache.set(BASE, "p", cached(), 60)
    fake.fail = True
    assert await cache.get(chat("A new question?"), "p", 0.5) is None
    await cache.set(chat("Another question?"), "p", cached(), 60)
    assert cache.errors == 2
    assert await cache.get(BASE, "p", 0.99) is not None  # remembered vector, no embedding needed


async def test_memory_semantic_bound_evicts_least_recently_used_context() -> None:
    index = MemorySemanticIndex(max_entries=3)
    cache = SemanticCache(index, FakeEmbedder())
    await cache.set(chat("q1?"), "old", cached(), 60)
    await cache.set(chat("q2?"), "old", cached(), 60)
    await cache.set(chat("q3?"), "new", cached(), 60)
    await cache.set(chat("q4?"), "new", cached(), 60)  # over the bound: one of "old" goes
    assert len(index) == 3
    assert await cache.get(chat("q3?"), "new", 0.99) is not None
    assert await cache.get(chat("q4?"), "new", 0.99) is not None
    assert sum([await cache.get(chat(q), "old", 0.99) is not None for q in ("q1?", "q2?")]) == 1
    for i in range(20):
        await cache.set(chat(f"many {i}?"), "newest", cached(), 60)
    assert len(index) == 3
    assert await cache.get(chat("q3?"), "new", 0.99) is None


async def test_redis_semantic_layout_bound_and_lazy_cleanup(
    redis_prefixed: tuple[aioredis.Redis, str],
) -> None:
    client, prefix = redis_prefixed
    index = RedisSemanticIndex(client, prefix=prefix, max_entries_per_context=3)
    fake = FakeEmbedder()
    cache = SemanticCache(index, fake)
    await cache.set(chat("short-lived?"), "p", cached(), 0.3)
    await cache.set(chat("long-lived?"), "p", cached(), 30)
    [vectors_key] = [k async for k in client.scan_iter(match=prefix + "*:v")]
    ctx = context_key(chat("x"), "p")
    assert vectors_key.decode() == f"{prefix}{{{ctx}}}:v"  # one hash per (scope, context), hash-tagged
    assert await client.type(vectors_key) == b"hash"
    assert 20_000 < await client.pttl(vectors_key) <= 30_000  # as long as its longest-lived entry
    records = await client.hgetall(vectors_key)
    assert {len(r) for r in records.values()} == {8 + 4 * fake.dim}  # epoch deadline + float32 vector
    some = next(iter(records.values()))
    assert np.frombuffer(some[8:], dtype="<f4").shape == (fake.dim,)
    await asyncio.sleep(0.5)
    assert await cache.get(chat("short-lived?"), "p", 0.99) is None
    assert await client.hlen(vectors_key) == 1  # the expired record was removed by the lookup
    for i in range(6):
        await cache.set(chat(f"q{i}?"), "p", cached(), 30)
    assert await client.hlen(vectors_key) == 3
    answers = [k async for k in client.scan_iter(match=prefix + "*:r:*")]
    assert len(answers) == 3  # evicted records take their answers with them


async def test_redis_semantic_is_shared_between_instances(redis_prefixed: tuple[aioredis.Redis, str]) -> None:
    client, prefix = redis_prefixed
    fake = FakeEmbedder()
    writer = SemanticCache(RedisSemanticIndex(client, prefix=prefix), fake)
    reader = SemanticCache(RedisSemanticIndex(client, prefix=prefix), fake)  # another replica
    started = time.monotonic()
    await writer.set(BASE, "p", cached("Paris."), 60)
    hit = await reader.get(BASE, "p", 0.99)
    assert hit is not None and hit[0].body["choices"][0]["message"]["content"] == "Paris."
    assert time.monotonic() - started < 1.0
