"""Tests for keel.testing.MockProvider, exercised with the real OpenAI / Anthropic SDKs over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel

from keel.testing import (
    MockProvider,
    MockState,
    RecordedRequest,
    mock_embedding,
    parse_fault,
)
from keel.testing import mock_provider as _mock_provider_fixture  # noqa: F401  (registers the fixture)

USER = [{"role": "user", "content": "Hello there"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ANTHROPIC_TOOL = {
    "name": "lookup",
    "description": "Look something up",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}
# connection-level errors (httpx / httpx2 / SDK wrappers), as opposed to HTTP status errors
TRANSPORT_ERRORS = {"RemoteProtocolError", "ReadError", "APIConnectionError"}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProvider]:
    with MockProvider() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(mock: MockProvider) -> Iterator[None]:
    mock.reset()
    yield
    mock.reset()
    mock.reply = None


@pytest.fixture
def oai(mock: MockProvider) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=mock.base_url, api_key="sk-upstream", max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture
def ant(mock: MockProvider) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=mock.url, api_key="ant-key", max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture
def http(mock: MockProvider) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.url, timeout=10) as client:
        yield client


def chat_body(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": USER, **extra}


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


# --------------------------------------------------------------------------------------------------
# basics
# --------------------------------------------------------------------------------------------------


def test_urls_health_and_models(mock: MockProvider, http: httpx.Client) -> None:
    assert mock.url == f"http://127.0.0.1:{mock.port}"
    assert mock.base_url == mock.url + "/v1"
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = openai.OpenAI(base_url=mock.base_url, api_key="x").models.list()
    ids = [m.id for m in models.data]
    assert "gpt-4o-mini" in ids and all(m.object == "model" for m in models.data)
    assert http.get("/v1/models/anything").json()["id"] == "anything"


def test_unknown_route_and_method_and_bad_json(http: httpx.Client) -> None:
    r = http.post("/v1/nope", json={})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/chat/completions").status_code == 405
    r = http.post(
        "/v1/chat/completions", content=b'{"model": "x", ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    r = http.post("/v1/messages", content=b"not json")
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = http.post("/v1/chat/completions", json={"model": "x", "messages": []})
    assert r.status_code == 400
    r = http.post("/v1/messages", json={"model": "claude", "messages": USER})  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_records_requests_and_headers(mock: MockProvider, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,  # type: ignore[arg-type]
        extra_headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    [req] = mock.requests
    assert isinstance(req, RecordedRequest)
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer sk-upstream"
    assert req.headers["traceparent"].startswith("00-0af7651916cd43dd")
    assert req.json["messages"] == USER and req.time <= time.time()
    assert mock.last_request is req
    mock.reset()
    assert mock.requests == []


def test_require_auth() -> None:
    with MockProvider(require_auth=True) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 401
        ok = client.post("/v1/chat/completions", json=chat_body(), headers={"authorization": "Bearer k"})
        assert ok.status_code == 200
        r = client.post("/v1/messages", json={"model": "c", "max_tokens": 5, "messages": USER})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = client.post(
            "/v1/messages",
            json={"model": "c", "max_tokens": 50, "messages": USER},
            headers={"x-api-key": "k"},
        )
        assert r.status_code == 200


def test_recording_cap_and_disable() -> None:
    with MockProvider(max_recorded=3) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            client.get("/health")
        assert len(server.requests) == 3
    with MockProvider(record=False) as server, httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert server.requests == []


# --------------------------------------------------------------------------------------------------
# OpenAI chat completions
# --------------------------------------------------------------------------------------------------


def test_openai_chat_non_stream(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="gpt-4o-mini", messages=USER)  # type: ignore[arg-type]
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o-mini"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Mock reply to: Hello there"
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_openai_reply_is_deterministic_and_truncated(mock: MockProvider, oai: openai.OpenAI) -> None:
    long_text = "word " * 100
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": long_text}]},
    ]
    a = oai.chat.completions.create(model="m", messages=messages)
    b = oai.chat.completions.create(model="m", messages=messages)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content == "Mock reply to: " + long_text[:200]
    assert a.usage == b.usage
    mock.reply = "fixed answer here"
    c = oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert c.choices[0].message.content == "fixed answer here"
    d = oai.chat.completions.create(model="m", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    assert d.choices[0].message.content == "fixed answer" and d.choices[0].finish_reason == "length"


def test_openai_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 4
    assert "".join(pieces) == "Mock reply to: Hello there"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_stream_wire_format(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in p for p in parsed)  # no include_usage -> no usage fields
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_tools_non_stream(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Please use a TOOL for the weather"}],
        tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "mock", "days": 1}  # type: ignore[union-attr]


def test_openai_tool_choice(oai: openai.OpenAI) -> None:
    forced = oai.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert forced.choices[0].message.tool_calls is not None
    assert forced.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[union-attr]
    assert json.loads(forced.choices[0].message.tool_calls[0].function.arguments) == {}  # type: ignore[union-attr]
    none = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "use a tool"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    no_word = oai.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert no_word.choices[0].message.tool_calls is None
    # After a tool result the model answers with text.
    follow_up = oai.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "use the tool"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert follow_up.choices[0].message.content == "Mock reply to: use the tool"


def test_openai_tools_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "call the tool please"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    chunks = list(stream)
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id is not None and first.id.startswith("call_")
    assert first.type == "function" and first.function is not None
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert len(deltas) >= 3
    assert all(d.id is None and d.function is not None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {"city": "mock", "days": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_response_format(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    assert json.loads(resp.choices[0].message.content or "") == {"reply": "Mock reply to: Hello there"}

    class Answer(BaseModel):
        title: str
        score: int
        tags: list[str]

    parsed = oai.chat.completions.parse(model="m", messages=USER, response_format=Answer)  # type: ignore[arg-type]
    answer = parsed.choices[0].message.parsed
    assert isinstance(answer, Answer)
    assert answer.score == 1 and answer.tags == ["mock"]


# --------------------------------------------------------------------------------------------------
# OpenAI embeddings
# --------------------------------------------------------------------------------------------------


def test_embeddings(oai: openai.OpenAI, http: httpx.Client) -> None:
    single = oai.embeddings.create(model="text-embedding-3-small", input="hello")  # SDK asks for base64
    assert len(single.data) == 1 and len(single.data[0].embedding) == 8
    assert single.data[0].embedding == mock_embedding("hello")
    assert single.usage.prompt_tokens > 0
    many = oai.embeddings.create(model="e", input=["a", "b", "a"], encoding_format="float")
    vectors = [d.embedding for d in many.data]
    assert [d.index for d in many.data] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-5
    r = http.post("/v1/embeddings", json={"model": "e", "input": "x", "dimensions": 4})
    assert r.json()["data"][0]["object"] == "embedding" and len(r.json()["data"][0]["embedding"]) == 4
    assert http.post("/v1/embeddings", json={"model": "e", "input": []}).status_code == 400


# --------------------------------------------------------------------------------------------------
# Anthropic messages
# --------------------------------------------------------------------------------------------------


def test_anthropic_non_stream(mock: MockProvider, ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        system=[{"type": "text", "text": "You are terse."}],
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "What is up?"}]},
        ],
    )
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-sonnet-4-5"
    assert msg.content[0].type == "text" and msg.content[0].text == "Mock reply to: What is up?"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens == 6
    req = mock.requests[-1]
    assert req.path == "/v1/messages" and req.headers["x-api-key"] == "ant-key"
    assert "anthropic-version" in req.headers


def test_anthropic_stream(ant: anthropic.Anthropic) -> None:
    with ant.messages.stream(model="claude", max_tokens=100, system="sys", messages=USER) as stream:  # type: ignore[arg-type]
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) >= 4 and "".join(texts) == "Mock reply to: Hello there"
    assert final.content[0].type == "text" and final.content[0].text == "Mock reply to: Hello there"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5 and final.usage.input_tokens > 0


def test_anthropic_stream_wire_format(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json={"model": "c", "max_tokens": 50, "stream": True, "messages": USER})
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    for block, name in zip(blocks, names, strict=True):
        assert json.loads(block.split("\n")[1].removeprefix("data: "))["type"] == name
    delta = json.loads(blocks[-2].split("\n")[1][6:])
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 5


def test_anthropic_tools(ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(
        model="claude",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "use the lookup tool"}],
    )
    assert msg.stop_reason == "tool_use"
    [block] = msg.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "lookup" and block.input == {"query": "mock"}

    with ant.messages.stream(
        model="claude",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tool time"}]}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"query": "mock"}

    # tool_result turn -> text reply; tool_choice none -> text reply
    follow = ant.messages.create(
        model="claude",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "use the tool"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]},
        ],
    )
    assert follow.stop_reason == "end_turn" and follow.content[0].type == "text"
    forced = ant.messages.create(
        model="claude",
        max_tokens=100,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "lookup"},
        messages=USER,  # type: ignore[arg-type]
    )
    assert forced.content[0].type == "tool_use"


def test_anthropic_count_tokens_and_max_tokens(ant: anthropic.Anthropic) -> None:
    count = ant.messages.count_tokens(model="claude", messages=USER)  # type: ignore[arg-type]
    assert count.input_tokens > 0
    msg = ant.messages.create(model="claude", max_tokens=2, messages=USER)  # type: ignore[arg-type]
    assert msg.stop_reason == "max_tokens" and msg.content[0].type == "text"
    assert msg.content[0].text == "Mock reply"


# --------------------------------------------------------------------------------------------------
# faults via the model name
# --------------------------------------------------------------------------------------------------


def test_fault_500(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.InternalServerError) as exc_info:
        oai.chat.completions.create(model="fault:500", messages=USER)  # type: ignore[arg-type]
    assert exc_info.value.status_code == 500
    assert exc_info.value.body["type"] == "server_error"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError) as a_info:
        ant.messages.create(model="fault:500", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert a_info.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_fault_429(oai: openai.OpenAI, ant: anthropic.Anthropic, http: httpx.Client) -> None:
    with pytest.raises(openai.RateLimitError) as exc_info:
        oai.chat.completions.create(model="fault:429", messages=USER)  # type: ignore[arg-type]
    assert exc_info.value.response.headers["retry-after"] == "1"
    assert exc_info.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as a_info:
        ant.messages.create(model="fault:429:7", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert a_info.value.response.headers["retry-after"] == "7"
    assert a_info.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    r = http.post("/v1/embeddings", json={"model": "fault:503", "input": "x"})
    assert r.status_code == 503 and "retry-after" not in r.headers


def test_fault_client_errors(oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="fault:400", messages=USER)  # type: ignore[arg-type]
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        oai.chat.completions.create(model="fault:401", messages=USER)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as ctx:
        oai.chat.completions.create(model="fault:context", messages=USER)  # type: ignore[arg-type]
    assert ctx.value.code == "context_length_exceeded"
    assert (
        ctx.value.message.startswith("Error code: 400") and "maximum context length is" in ctx.value.message
    )
    with pytest.raises(anthropic.BadRequestError) as a_ctx:
        ant.messages.create(model="fault:context", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert "prompt is too long" in a_ctx.value.message
    with pytest.raises(anthropic.AuthenticationError):
        ant.messages.create(model="fault:401", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="invalid mock fault"):
        oai.chat.completions.create(model="fault:bogus", messages=USER)  # type: ignore[arg-type]


def test_fault_badjson_and_empty(http: httpx.Client, oai: openai.OpenAI) -> None:
    r = http.post("/v1/chat/completions", json=chat_body("fault:badjson"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    r = http.post("/v1/messages", json={"model": "fault:badjson", "max_tokens": 5, "messages": USER})
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    r = http.post("/v1/chat/completions", json=chat_body("fault:badjson", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    with pytest.raises(json.JSONDecodeError):
        json.loads(sse_data(r.text)[0])
    r = http.post("/v1/chat/completions", json=chat_body("fault:empty"))
    assert r.status_code == 200 and r.content == b""
    with pytest.raises((openai.APIError, ValueError)):  # the SDK surfaces the JSONDecodeError
        oai.chat.completions.create(model="fault:badjson", messages=USER)  # type: ignore[arg-type]


def test_fault_slow(http: httpx.Client, oai: openai.OpenAI) -> None:
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json=chat_body("fault:slow:0.3"))
    assert time.perf_counter() - t0 >= 0.2
    assert r.status_code == 200 and r.json()["model"] == "fault:slow:0.3"
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=chat_body("fault:slow:0.3", stream=True)) as resp:
        lines = resp.iter_lines()
        first = next(lines)
        assert time.perf_counter() - t0 >= 0.2
        assert first.startswith("data: ")
        rest = list(lines)
    assert "data: [DONE]" in rest
    t0 = time.perf_counter()
    stream = oai.chat.completions.create(model="fault:drip:0.05", messages=USER, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert len(chunks) >= 6 and time.perf_counter() - t0 >= 0.2


def test_fault_reset(http: httpx.Client, oai: openai.OpenAI, mock: MockProvider) -> None:
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        http.post("/v1/chat/completions", json=chat_body("fault:reset"))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="fault:reset", messages=USER)  # type: ignore[arg-type]
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):  # non-stream cut == reset
        http.post("/v1/chat/completions", json=chat_body("fault:cut:2"))

    async def with_aiohttp() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{mock.base_url}/messages", json={"model": "fault:reset"}) as resp:
                await resp.read()

    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        asyncio.run(with_aiohttp())
    # the server is still healthy afterwards
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_fault_cut_stream(http: httpx.Client, oai: openai.OpenAI, ant: anthropic.Anthropic) -> None:
    lines: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with http.stream("POST", "/v1/chat/completions", json=chat_body("fault:cut:2", stream=True)) as resp:
            assert resp.status_code == 200
            lines.extend(line for line in resp.iter_lines() if line)
    assert len(lines) == 2 and all(line.startswith("data: {") for line in lines)

    # The SDKs surface the transport error of their HTTP library (httpx or httpx2) while iterating.
    received = []
    with pytest.raises(Exception) as oai_error:
        for chunk in oai.chat.completions.create(model="fault:cut:3", messages=USER, stream=True):  # type: ignore[arg-type]
            received.append(chunk)
    assert type(oai_error.value).__name__ in TRANSPORT_ERRORS
    assert len(received) == 3

    texts: list[str] = []
    with pytest.raises(Exception) as ant_error:
        with ant.messages.stream(model="fault:cut:4", max_tokens=50, messages=USER) as stream:  # type: ignore[arg-type]
            texts.extend(stream.text_stream)
    assert type(ant_error.value).__name__ in TRANSPORT_ERRORS
    assert texts == ["Mock"]  # message_start, content_block_start, ping, first delta


# --------------------------------------------------------------------------------------------------
# programmatic faults
# --------------------------------------------------------------------------------------------------


def test_set_fault_times_then_recovers(mock: MockProvider, oai: openai.OpenAI, http: httpx.Client) -> None:
    mock.set_fault("500", times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert oai.chat.completions.create(model="m", messages=USER).choices[0].finish_reason == "stop"  # type: ignore[arg-type]
    assert http.get("/health").status_code == 200

    mock.set_fault("429:3")
    for _ in range(3):
        assert http.post("/v1/embeddings", json={"model": "e", "input": "x"}).status_code == 429
    assert http.get("/health").status_code == 200  # health is never faulted
    mock.set_fault(None)
    assert http.post("/v1/embeddings", json={"model": "e", "input": "x"}).status_code == 200

    mock.set_fault("slow:0.3")
    t0 = time.perf_counter()
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert time.perf_counter() - t0 >= 0.2

    mock.set_fault("reset", times=1)
    with pytest.raises(httpx.TransportError):
        http.post("/v1/chat/completions", json=chat_body())
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200

    mock.set_fault("500")
    assert http.post("/v1/chat/completions", json=chat_body("fault:401")).status_code == 401  # model wins
    mock.reset()
    assert mock.state.fault is None and mock.requests == []
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_control_routes(http: httpx.Client) -> None:
    assert http.post("/_mock/fault", json={"fault": "503", "times": 1}).status_code == 200
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 503
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200
    recorded = http.get("/_mock/requests").json()
    assert [r["path"] for r in recorded] == ["/v1/chat/completions"] * 2
    assert http.post("/_mock/fault", json={"fault": "nope"}).status_code == 400
    assert http.post("/_mock/reset").status_code == 200
    assert http.get("/_mock/requests").json() == []


def test_parse_fault() -> None:
    assert parse_fault("fault:429").retry_after == 1
    assert parse_fault("429:2.5").retry_after == 2.5
    assert parse_fault("500").retry_after is None
    assert parse_fault("cut:3").count == 3
    assert parse_fault("slow:0.25").seconds == 0.25
    for bad in ("", "600", "slow", "slow:x", "cut:-1", "reset:1", "teapot"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    state = MockState()
    with pytest.raises(ValueError):
        state.set_fault("slow:abc")


# --------------------------------------------------------------------------------------------------
# pytest fixture, import hygiene, command line
# --------------------------------------------------------------------------------------------------


def test_mock_provider_fixture(mock_provider: MockProvider) -> None:
    assert mock_provider.running
    client = openai.OpenAI(base_url=mock_provider.base_url, api_key="x", max_retries=0)
    resp = client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "Mock reply to: Hello there"
    assert len(mock_provider.requests) == 1


def test_stop_is_fast_and_idempotent() -> None:
    server = MockProvider().start()
    port = server.port
    assert httpx.get(server.url + "/health").status_code == 200
    t0 = time.perf_counter()
    server.stop()
    assert time.perf_counter() - t0 < 2.0
    server.stop()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, threading, keel.testing\n"
        "assert 'pytest' not in sys.modules, 'pytest imported'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "from keel.testing import *\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_command_line(workers: int) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.testing", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "CLI mock provider did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        resp = client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
        assert resp.choices[0].message.content == "Mock reply to: Hello there"
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="fault:reset", messages=USER)  # type: ignore[arg-type]
        assert httpx.get(f"http://127.0.0.1:{port}/_mock/requests").json() == []  # recording off by default
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
