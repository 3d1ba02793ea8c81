"""keel.sdk.prompts against a real keel: TTL cache, stale-while-revalidate, fallback with the server stopped."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel.errors import BadRequest, KeelError, NotFound
from keel.sdk import prompts as sdk_prompts
from keel.sdk.prompts import PromptClient
from tests.conftest import MASTER_KEY, make_keel


def push(http: httpx.Client, name: str, marker: str, **kw: Any) -> None:
    r = http.post(
        "/api/prompts",
        json={
            "name": name,
            "type": "chat",
            "messages": [
                {"role": "system", "content": "Support for {{ product }}."},
                {"role": "user", "content": marker + " {{ question }}"},
            ],
            "variables": {"product": {"type": "string", "default": "keel"}, "question": "string"},
            "config": {"model": "gpt-4o-mini", "temperature": 0.1, "owner_note": "info only"},
            **kw,
        },
    )
    assert r.status_code in (200, 201), r.text


def wait(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_get_compile_and_ttl_cache(keel: Any) -> None:
    name = f"sdk-{uuid.uuid4().hex[:6]}"
    push(keel.http, name, "V1", labels=["production"])
    client = PromptClient(keel.url, keel.master_key, ttl_s=3600)
    p = client.get(name)
    assert (p.name, p.version, p.label, p.source) == (name, 1, "production", "server")
    assert client.get(name) is p and client.fetches == 1  # fresh: from the cache, no request
    compiled = p.compile(question="Where is it?")
    assert compiled == {
        "model": "gpt-4o-mini",
        "temperature": 0.1,
        "messages": [
            {"role": "system", "content": "Support for keel."},
            {"role": "user", "content": "V1 Where is it?"},
        ],
    }
    with pytest.raises(BadRequest, match="missing variable 'question'"):
        p.compile()
    with pytest.raises(BadRequest, match="'question' must be of type string"):
        p.compile(question=3)
    with pytest.raises(NotFound):
        client.get(f"nope-{name}")

    # the compiled request goes through the gateway as is
    import openai

    reply = openai.OpenAI(
        base_url=keel.url + "/v1", api_key=keel.master_key, max_retries=0
    ).chat.completions.create(**compiled)
    assert reply.choices[0].message.content == "Mock reply to: V1 Where is it?"
    client.close()


def test_compile_records_prompt_on_the_current_span(keel: Any) -> None:
    name = f"span-{uuid.uuid4().hex[:6]}"
    push(keel.http, name, "V1", labels=["production"])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    client = PromptClient(keel.url, keel.master_key)
    with tracer.start_as_current_span("answer"):
        client.get(name).compile(question="q")
    (span,) = exporter.get_finished_spans()
    assert span.attributes["keel.prompt.name"] == name and span.attributes["keel.prompt.version"] == 1


def test_stale_while_revalidate(keel: Any) -> None:
    name = f"swr-{uuid.uuid4().hex[:6]}"
    push(keel.http, name, "V1", labels=["production"])
    push(keel.http, name, "V2")
    client = PromptClient(keel.url, keel.master_key, ttl_s=0.0)  # every entry is stale at once
    assert client.get(name).version == 1
    keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 2})
    stale = client.get(name)
    assert stale.version == 1  # answered from the cache at once ...
    wait(lambda: client.fetches == 2 and not client._refreshing)  # ... while one refresh runs behind it
    assert client.get(name).version == 2


def test_sticky_canary_through_the_sdk(keel: Any) -> None:
    name = f"can-{uuid.uuid4().hex[:6]}"
    push(keel.http, name, "V1", labels=["production"])
    push(keel.http, name, "V2")
    keel.http.put(
        f"/api/prompts/{name}/labels/production",
        json={"split": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]},
    )
    client = PromptClient(keel.url, keel.master_key)
    picks = {u: client.get(name, user=u).version for u in (f"u{i}" for i in range(40))}
    assert set(picks.values()) == {1, 2}
    fresh = PromptClient(keel.url, keel.master_key)
    assert all(fresh.get(name, user=u).version == v for u, v in picks.items())


def test_fallback_with_the_server_stopped(
    tmp_path: Path, mock_upstream: Any, request: pytest.FixtureRequest
) -> None:
    server, _ = make_keel("sqlite", tmp_path, mock_upstream, request)
    name = f"off-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {MASTER_KEY}"}) as http:
        push(http, name, "V1", labels=["production"])
    warm = PromptClient(server.url, MASTER_KEY, ttl_s=0.0, timeout_s=2)
    assert warm.get(name).version == 1
    repo = tmp_path / "prompts"
    repo.mkdir()
    (repo / "support.yaml").write_text(
        f"name: {name}\ntype: chat\nmessages:\n  - {{role: user, content: 'local {{{{ question }}}}'}}\n"
        "config: {model: gpt-4o-mini}\n"
    )
    sdk_prompts.configure(base_url=server.url, api_key=MASTER_KEY, fallback_dir=repo, timeout_s=2)
    server.stop()

    # the last version fetched keeps serving (its refresh fails quietly in the background)
    assert warm.get(name).version == 1
    wait(lambda: not warm._refreshing)
    assert warm.get(name).compile(question="q")["messages"][1]["content"] == "V1 q"

    # a cold client falls back to the local prompt file, the per-call fallback, or says why it cannot
    p = sdk_prompts.get(name)
    assert (p.source, p.version) == ("fallback", None)
    assert p.compile(question="hi") == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "local hi"}],
    }
    cold = PromptClient(server.url, MASTER_KEY, timeout_s=2)
    assert cold.get(name, fallback="Answer: {{ question }}").compile(question="x")["messages"] == [
        {"role": "user", "content": "Answer: x"}
    ]
    with pytest.raises(KeelError) as info:
        cold.get(name)
    assert info.value.code == "prompts_unreachable" and "unreachable" in info.value.message
