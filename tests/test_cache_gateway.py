"""Response caching through the gateway: exact and semantic hits never reach the upstream, and are traced."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from keel.config import CacheConfig, ModelConfig
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel, make_keel


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockProvider]:
    with MockProvider() as m:
        yield m


@pytest.fixture(scope="module", params=BACKENDS)
def cached(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: MockProvider
) -> Iterator[Keel]:
    models = (
        ModelConfig(name="gpt-4o-mini", provider="openai", api_base=upstream.base_url),
        ModelConfig(
            name="claude-haiku", provider="anthropic", model="claude-3-5-haiku-latest", api_base=upstream.url
        ),
        ModelConfig(
            name="uncached", provider="openai-compatible", model="gpt-4o-mini", api_base=upstream.base_url
        ),
    )
    cache = CacheConfig(
        enabled=True, semantic=True, semantic_threshold=0.85, models=["gpt-4o-mini", "claude-haiku"]
    )
    server, app = make_keel(
        request.param, tmp_path_factory.mktemp("cache"), upstream, request, models=models, cache=cache
    )
    k = Keel(server, app, request.param)
    yield k
    k.http.close()
    server.stop()


RUN = uuid.uuid4().hex  # Redis outlives a test run: every run asks in its own context


def ask(k: Keel, text: str, key: str | None = None, model: str = "gpt-4o-mini", **kw: Any) -> Any:
    c = openai.OpenAI(base_url=k.url + "/v1", api_key=key or k.master_key, max_retries=0)
    messages = [{"role": "system", "content": f"run {RUN}"}, {"role": "user", "content": text}]
    return c.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)


def upstream_calls(m: MockProvider, text: str) -> int:
    return sum(1 for r in m.requests if r.json and str(r.json).find(text) >= 0)


def wait_for_store(k: Keel, text: str, model: str = "gpt-4o-mini") -> None:
    """The answer is stored in the background: poll until a repeat is a hit."""
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if ask(k, text, model=model).headers["x-keel-cache"] == "hit":
            return
        time.sleep(0.1)
    raise AssertionError("the answer never reached the cache")


def test_exact_hit_skips_the_upstream_and_is_traced(cached: Keel, upstream: MockProvider) -> None:
    text = f"exact question {cached.backend} {id(cached)}"
    first = ask(cached, text)
    assert first.headers["x-keel-cache"] == "miss"
    wait_for_store(cached, text)
    n = upstream_calls(upstream, text)
    again = ask(cached, text)
    assert again.headers["x-keel-cache"] == "hit" and upstream_calls(upstream, text) == n
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    trace = cached.wait_for_trace(again.headers["x-keel-trace-id"])
    span = trace["spans"][0]
    assert span["attributes"]["keel.cache"] == "exact" and span["cost_usd"] == 0.0
    assert span["attributes"]["keel.cost_saved_usd"] > 0 and span["provider"] == "cache"
    miss_span = cached.wait_for_trace(first.headers["x-keel-trace-id"])["spans"][0]
    assert miss_span["attributes"]["keel.cache"] == "miss" and miss_span["cost_usd"] > 0
    # a streaming request for the same question is replayed from the cache
    c = openai.OpenAI(base_url=cached.url + "/v1", api_key=cached.master_key, max_retries=0)
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": f"run {RUN}"}, {"role": "user", "content": text}],
        stream=True,
    ) as raw:
        assert raw.headers["x-keel-cache"] == "hit"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert streamed == first.parse().choices[0].message.content and upstream_calls(upstream, text) == n


def test_semantic_hit_on_a_paraphrase(cached: Keel, upstream: MockProvider) -> None:
    ask(cached, "What is the capital of France?", temperature=0.3)
    import time

    deadline = time.monotonic() + 20
    while True:
        raw = ask(cached, "Which city is the capital of France?", temperature=0.3)
        if raw.headers["x-keel-cache"] == "hit" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert raw.headers["x-keel-cache"] == "hit"
    assert raw.parse().choices[0].message.content == "Mock reply to: What is the capital of France?"
    span = cached.wait_for_trace(raw.headers["x-keel-trace-id"])["spans"][0]
    assert (
        span["attributes"]["keel.cache"] == "semantic" and span["attributes"]["keel.cache_similarity"] >= 0.85
    )
    unrelated = ask(cached, "How do I bake sourdough bread?", temperature=0.3)
    assert unrelated.headers["x-keel-cache"] == "miss"


def test_no_cache_header_tools_and_other_projects_bypass(cached: Keel, upstream: MockProvider) -> None:
    text = f"bypass question {cached.backend}"
    ask(cached, text)
    wait_for_store(cached, text)
    n = upstream_calls(upstream, text)
    r = ask(cached, text, extra_headers={"cache-control": "no-cache"})
    assert r.headers["x-keel-cache"] == "miss" and upstream_calls(upstream, text) == n + 1
    other = cached.create_key(project="cache-other")["key"]
    assert ask(cached, text, key=other).headers["x-keel-cache"] == "miss"  # projects never share entries
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    r1 = ask(cached, "tool question", tools=tools)
    r2 = ask(cached, "tool question", tools=tools)
    assert r1.headers["x-keel-cache"] == r2.headers["x-keel-cache"] == "miss"
    span = cached.wait_for_trace(r2.headers["x-keel-trace-id"])["spans"][0]
    assert span["attributes"]["keel.cache"].startswith("bypass")
    assert "x-keel-cache" not in ask(cached, text, model="uncached").headers


def test_anthropic_ingress_is_cached_too(cached: Keel, upstream: MockProvider) -> None:
    c = anthropic.Anthropic(base_url=cached.url, api_key=cached.master_key, max_retries=0)
    text = f"anthropic cached {cached.backend} {RUN}"
    first = c.messages.with_raw_response.create(
        model="claude-haiku", max_tokens=30, system=f"run {RUN}", messages=[{"role": "user", "content": text}]
    )
    assert first.headers["x-keel-cache"] == "miss"
    import time

    deadline = time.monotonic() + 15
    while True:
        again = c.messages.with_raw_response.create(
            model="claude-haiku",
            max_tokens=30,
            system=f"run {RUN}",
            messages=[{"role": "user", "content": text}],
        )
        if again.headers["x-keel-cache"] == "hit" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.headers["x-keel-cache"] == "hit"
    assert again.parse().content[0].text == first.parse().content[0].text  # type: ignore[union-attr]
    assert (
        "keel_cache_hits_total"
        in httpx.get(cached.url + "/metrics", headers={"authorization": f"Bearer {cached.master_key}"}).text
    )
