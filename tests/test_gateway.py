"""The gateway through the official SDKs, against the real mock upstream, on both backends."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest

from keel.testing import MockProvider
from tests.conftest import Keel


def client(keel: Keel, key: str | None = None, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=keel.url + "/v1", api_key=key or keel.master_key, max_retries=0, **kw)  # type: ignore[arg-type]


def trace_of(raw: object) -> str:
    tid = raw.headers["x-keel-trace-id"]  # type: ignore[attr-defined]
    assert len(tid) == 32
    return str(tid)


def llm_span(trace: dict) -> dict:
    spans = [s for s in trace["spans"] if s["kind"] == "llm"]
    assert len(spans) == 1, trace
    return spans[0]


def test_health_needs_no_key(keel: Keel) -> None:
    r = httpx.get(keel.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models_list(keel: Keel) -> None:
    ids = {m.id for m in client(keel).models.list()}
    assert {"gpt-4o-mini", "claude-haiku", "cheap"} <= ids


def test_chat_non_stream_is_proxied_and_traced(keel: Keel, mock_upstream: MockProvider) -> None:
    tag = "t-" + uuid.uuid4().hex[:8]
    raw = client(keel).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        user="alice",
        temperature=0.2,
        extra_headers={"x-keel-tags": f"{tag}, checkout", "x-keel-metadata": '{"feature": "faq"}'},
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "Mock reply to: hello there"
    assert resp.usage and resp.usage.prompt_tokens > 0
    sent = mock_upstream.last_request
    assert sent is not None and sent.path == "/v1/chat/completions"
    assert (
        sent.headers["authorization"] == "Bearer sk-upstream-openai"
    )  # the upstream key, never the client's
    trace = keel.wait_for_trace(trace_of(raw))
    span = llm_span(trace)
    assert trace["status"] == "ok" and span["status_code"] == 200
    assert (
        span["provider"] == "openai"
        and span["requested_model"] == "gpt-4o-mini"
        and span["model"] == "gpt-4o-mini"
    )
    assert (
        span["input_tokens"] == resp.usage.prompt_tokens
        and span["output_tokens"] == resp.usage.completion_tokens
    )
    # priced by the genai-prices catalog: gpt-4o-mini is $0.15 / $0.60 per MTok
    expected = (resp.usage.prompt_tokens * 0.15 + resp.usage.completion_tokens * 0.60) / 1e6
    assert span["cost_usd"] == pytest.approx(expected, rel=1e-6) and span["priced"] is True
    assert trace["user"] == "alice" and set(trace["tags"]) == {tag, "checkout"}
    assert span["attributes"]["keel.metadata"] == {"feature": "faq"}
    assert span["input"]["messages"][1]["content"] == "hello there" and span["input"]["temperature"] == 0.2
    assert span["output"]["choices"][0]["message"]["content"] == "Mock reply to: hello there"
    assert span["latency_ms"] > 0 and span["ttft_ms"] is None


def test_chat_stream_forwards_chunks_and_records_usage(keel: Keel, mock_upstream: MockProvider) -> None:
    c = client(keel)
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream me a reply"}], stream=True
    ) as raw:
        tid = raw.headers["x-keel-trace-id"]
        chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Mock reply to: stream me a reply"
    # the client did not ask for usage: keel asked the upstream for it, and kept it out of the client's stream
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)
    assert mock_upstream.last_request.json["stream_options"] == {"include_usage": True}  # type: ignore[union-attr]
    span = llm_span(keel.wait_for_trace(tid))
    assert span["input_tokens"] > 0 and span["output_tokens"] > 0 and span["cost_usd"] > 0
    assert span["ttft_ms"] is not None and 0 < span["ttft_ms"] <= span["latency_ms"]
    assert span["output"]["content"] == text and span["output"]["finish_reason"] == "stop"
    assert span["attributes"]["keel.stream"] is True


def test_stream_with_usage_requested(keel: Keel) -> None:
    stream = client(keel).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tools_pass_through(keel: Keel, stream: bool) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    c = client(keel)
    msgs = [{"role": "user", "content": "use a tool for the weather in Paris"}]
    if not stream:
        resp = c.chat.completions.create(model="gpt-4o-mini", messages=msgs, tools=tools)  # type: ignore[arg-type]
        call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert resp.choices[0].finish_reason == "tool_calls"
        name, args = call.function.name, call.function.arguments  # type: ignore[union-attr]
    else:
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=msgs, tools=tools, stream=True))  # type: ignore[arg-type]
        deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        name = "".join(d.function.name or "" for d in deltas if d.function)
        args = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert name == "get_weather"
    assert "city" in orjson.loads(args)


def test_response_format_passes_through(keel: Keel, mock_upstream: MockProvider) -> None:
    resp = client(keel).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(orjson.loads(resp.choices[0].message.content or ""), dict)
    assert mock_upstream.last_request.json["response_format"] == {"type": "json_object"}  # type: ignore[union-attr]


def test_anthropic_upstream_non_stream(keel: Keel, mock_upstream: MockProvider) -> None:
    raw = client(keel).chat.completions.with_raw_response.create(
        model="claude-haiku",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi claude"}],
        max_tokens=100,
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "Mock reply to: hi claude"
    sent = mock_upstream.last_request
    assert sent is not None and sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-upstream-anthropic" and "anthropic-version" in sent.headers
    assert sent.json["system"] == "You are terse." and sent.json["model"] == "claude-3-5-haiku-latest"  # type: ignore[index]
    assert sent.json["messages"] == [{"role": "user", "content": "hi claude"}]  # type: ignore[index]
    span = llm_span(keel.wait_for_trace(trace_of(raw)))
    assert span["provider"] == "anthropic" and span["input_tokens"] > 0 and span["output_tokens"] > 0
    assert span["cost_usd"] is not None and span["cost_usd"] > 0


def test_anthropic_upstream_stream_and_tools(keel: Keel) -> None:
    c = client(keel)
    chunks = list(
        c.chat.completions.create(
            model="claude-haiku",
            messages=[{"role": "user", "content": "stream from claude"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Mock reply to: stream from claude"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            },
        }
    ]
    resp = c.chat.completions.create(
        model="claude-haiku",
        messages=[{"role": "user", "content": "call the tool please"}],
        tools=tools,  # type: ignore[arg-type]
    )
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup" and "q" in orjson.loads(call.function.arguments)  # type: ignore[union-attr]
    assert resp.choices[0].finish_reason == "tool_calls"
    streamed = list(
        c.chat.completions.create(
            model="claude-haiku",
            messages=[{"role": "user", "content": "call the tool please"}],
            tools=tools,
            stream=True,  # type: ignore[arg-type]
        )
    )
    args = "".join(
        tc.function.arguments or ""
        for ch in streamed
        if ch.choices
        for tc in (ch.choices[0].delta.tool_calls or [])
        if tc.function
    )
    assert "q" in orjson.loads(args)


def test_traceparent_is_honoured(keel: Keel, mock_upstream: MockProvider) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    raw = client(keel).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "joined"}],
        extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert raw.headers["x-keel-trace-id"] == trace_id
    forwarded = mock_upstream.last_request.headers["traceparent"]  # type: ignore[union-attr]
    assert forwarded.startswith(f"00-{trace_id}-") and not forwarded.startswith(f"00-{trace_id}-{parent}")
    span = llm_span(keel.wait_for_trace(trace_id))
    assert span["parent_span_id"] == parent and forwarded.split("-")[2] == span["span_id"]


# -- errors: each gets the right status in OpenAI's shape, and each is a trace ------------------------


def _error_trace(keel: Keel, resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["code"] == code
    assert "Traceback" not in resp.text
    trace = keel.wait_for_trace(resp.headers["x-keel-trace-id"])
    span = llm_span(trace)
    assert trace["status"] == "error" and span["status_code"] == status and code in span["error"]
    return span


def post(
    keel: Keel, body: object, key: str | None = "master", raw: bytes | None = None, **headers: str
) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key:
        h["authorization"] = f"Bearer {keel.master_key if key == 'master' else key}"
    content = raw if raw is not None else orjson.dumps(body)
    return httpx.post(keel.url + "/v1/chat/completions", content=content, headers=h, timeout=30)


MSGS = [{"role": "user", "content": "hi"}]


def test_unknown_model_404(keel: Keel) -> None:
    with pytest.raises(openai.NotFoundError):
        client(keel).chat.completions.create(model="no-such-model", messages=MSGS)  # type: ignore[arg-type]
    span = _error_trace(
        keel, post(keel, {"model": "no-such-model", "messages": MSGS}), 404, "model_not_found"
    )
    assert span["requested_model"] == "no-such-model"


def test_bad_key_401_and_missing_key_401(keel: Keel) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(keel, key="sk-wrong").chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # type: ignore[arg-type]
    _error_trace(
        keel, post(keel, {"model": "gpt-4o-mini", "messages": MSGS}, key="sk-wrong"), 401, "invalid_api_key"
    )
    _error_trace(
        keel, post(keel, {"model": "gpt-4o-mini", "messages": MSGS}, key=None), 401, "missing_api_key"
    )


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"model": "gpt-4o-mini", "messages": [', "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_request"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_model"),
        (b'{"model": "gpt-4o-mini", "messages": []}', "invalid_messages"),
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]}', "invalid_messages"),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            "invalid_request",
        ),
        (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            "invalid_request",
        ),
    ],
)
def test_malformed_requests_400(keel: Keel, raw: bytes, code: str) -> None:
    _error_trace(keel, post(keel, None, raw=raw), 400, code)


def test_bad_request_via_sdk(keel: Keel) -> None:
    with pytest.raises(openai.BadRequestError):
        client(keel).chat.completions.create(model="gpt-4o-mini", messages=[])


def test_dead_upstream_502(keel: Keel) -> None:
    with pytest.raises(openai.InternalServerError) as exc:
        client(keel).chat.completions.create(model="dead", messages=MSGS)  # type: ignore[arg-type]
    assert exc.value.status_code == 502
    span = _error_trace(
        keel, post(keel, {"model": "dead", "messages": MSGS}), 502, "upstream_connection_error"
    )
    assert span["provider"] == "openai-compatible"


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("fault-500", 502, "upstream_error"),
        ("fault-reset", 502, "upstream_connection_error"),
        ("fault-badjson", 502, "upstream_bad_response"),
        ("fault-empty", 502, "upstream_bad_response"),
        ("fault-401", 502, "upstream_auth_error"),
        ("fault-429", 429, "upstream_rate_limited"),
        ("fault-context", 400, "context_length_exceeded"),
        ("claude-fault-500", 502, "upstream_error"),
    ],
)
def test_upstream_faults(keel: Keel, model: str, status: int, code: str) -> None:
    resp = post(keel, {"model": model, "messages": MSGS})
    _error_trace(keel, resp, status, code)
    if status == 429:
        assert resp.headers["retry-after"] == "1"


@pytest.mark.parametrize("model", ["fault-500", "fault-reset", "dead"])
def test_stream_fails_before_first_byte_with_status(keel: Keel, model: str) -> None:
    resp = post(keel, {"model": model, "messages": MSGS, "stream": True})
    assert resp.status_code == 502 and resp.json()["error"]["code"].startswith("upstream")


@pytest.mark.parametrize("model", ["fault-cut", "claude-fault-cut"])
def test_stream_cut_midway_ends_with_error_event_and_keeps_partial_output(keel: Keel, model: str) -> None:
    c = client(keel)
    got: list[str] = []
    with pytest.raises(openai.APIError) as exc:
        with c.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": "a long story about the sea"}], stream=True
        ) as raw:
            tid = raw.headers["x-keel-trace-id"]
            for ch in raw.parse():
                if ch.choices and ch.choices[0].delta.content:
                    got.append(ch.choices[0].delta.content)
    assert "ended before completion" in str(exc.value) or "connection" in str(exc.value)
    assert got, "some chunks arrived before the cut"
    trace = keel.wait_for_trace(tid)
    span = llm_span(trace)
    assert trace["status"] == "error" and span["output"]["content"] == "".join(got)
    assert span["error"].startswith("upstream_")


def test_slow_upstream_still_answers(keel: Keel) -> None:
    resp = client(keel).chat.completions.create(model="fault-slow", messages=MSGS)  # type: ignore[arg-type]
    assert resp.choices[0].message.content


# -- keys ------------------------------------------------------------------------------------------------


def test_key_limited_to_models_gets_403(keel: Keel) -> None:
    key = keel.create_key(project="limited-" + uuid.uuid4().hex[:6], models=["gpt-4o-mini"])["key"]
    ok = client(keel, key=key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # type: ignore[arg-type]
    assert ok.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client(keel, key=key).chat.completions.create(model="claude-haiku", messages=MSGS)  # type: ignore[arg-type]
    assert {m.id for m in client(keel, key=key).models.list()} == {"gpt-4o-mini"}
    span = _error_trace(
        keel, post(keel, {"model": "claude-haiku", "messages": MSGS}, key=key), 403, "model_not_allowed"
    )
    assert span["requested_model"] == "claude-haiku"


def test_revoked_key_is_refused_at_once(keel: Keel) -> None:
    created = keel.create_key(project="revoke-test")
    c = client(keel, key=created["key"])
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices  # type: ignore[arg-type]
    assert keel.http.delete(f"/api/keys/{created['id']}").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # type: ignore[arg-type]


def test_trace_records_project_and_key(keel: Keel) -> None:
    project = "proj-" + uuid.uuid4().hex[:6]
    created = keel.create_key(project=project)
    raw = client(keel, key=created["key"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSGS
    )  # type: ignore[arg-type]
    trace = keel.wait_for_trace(trace_of(raw))
    assert trace["project_id"] == created["project_id"] and trace["key_id"] == created["id"]


# -- load ------------------------------------------------------------------------------------------------


def test_500_concurrent_requests_leave_500_traces(keel: Keel) -> None:
    tag = "load-" + uuid.uuid4().hex[:8]

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=keel.url, timeout=60, limits=limits) as ac:
            headers = {"authorization": f"Bearer {keel.master_key}", "x-keel-tags": tag}

            async def one(i: int) -> httpx.Response:
                body = {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"request {i}"}],
                    "stream": i % 5 == 0,
                }
                return await ac.post("/v1/chat/completions", json=body, headers=headers)

            return await asyncio.gather(*(one(i) for i in range(500)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses].count(200) == 500
    ids = {r.headers["x-keel-trace-id"] for r in responses}
    assert len(ids) == 500
    import time

    from keel.store import TraceFilter

    deadline = time.monotonic() + 30
    while True:
        rows, _ = keel.store.list_traces(TraceFilter(tag=tag), limit=1000)
        if len(rows) >= 500 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == 500 and {r["trace_id"] for r in rows} == ids
    assert all(r["input_tokens"] > 0 and r["output_tokens"] > 0 and r["cost_usd"] > 0 for r in rows)


# -- pricing ---------------------------------------------------------------------------------------------


def test_config_price_override_and_unpriced(keel: Keel) -> None:
    raw = client(keel).chat.completions.with_raw_response.create(model="cheap", messages=MSGS)  # type: ignore[arg-type]
    resp = raw.parse()
    span = llm_span(keel.wait_for_trace(trace_of(raw)))
    assert resp.usage is not None
    assert span["cost_usd"] == pytest.approx(
        (resp.usage.prompt_tokens * 1.0 + resp.usage.completion_tokens * 2.0) / 1e6
    )
    raw = client(keel).chat.completions.with_raw_response.create(model="unpriced", messages=MSGS)  # type: ignore[arg-type]
    span = llm_span(keel.wait_for_trace(trace_of(raw)))
    assert span["cost_usd"] is None and span["priced"] is False and span["input_tokens"] > 0
    metrics = keel.http.get("/metrics").text
    assert "keel_unpriced_spans_total" in metrics


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_too_large_413_is_traced(
    backend: str,
    mock_upstream: MockProvider,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    from tests.conftest import BACKENDS, make_keel

    if backend not in BACKENDS:
        pytest.fail(f"backend {backend} excluded by KEEL_TEST_BACKENDS; this leg is required in CI")
    server, app = make_keel(
        backend, tmp_path_factory.mktemp("small"), mock_upstream, request, max_request_bytes=2048
    )
    k = Keel(server, app, backend)
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 4096}]}
        span = _error_trace(k, post(k, body), 413, "request_too_large")
        assert span["input"] is None  # the oversized body is refused unread
        # chunked upload without content-length is cut off too
        chunks = (b"x" * 1024 for _ in range(8))
        r = httpx.post(
            k.url + "/v1/chat/completions",
            content=chunks,
            headers={"authorization": f"Bearer {k.master_key}"},
        )
        assert r.status_code == 413
        with pytest.raises(openai.APIStatusError) as exc:
            client(k).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "y" * 4096}]
            )
        assert exc.value.status_code == 413
    finally:
        k.http.close()
        server.stop()


def test_usage_is_counted_when_the_upstream_reports_none() -> None:
    from keel.gateway.core import _estimate_usage

    u = _estimate_usage({"messages": [{"role": "user", "content": "hello world"}]}, "Hi there, friend.")
    assert u.estimated and u.input_tokens == 3 + 3 + 2 and u.output_tokens == 5


def test_a_provider_bug_is_an_openai_shaped_500_with_a_trace(
    tmp_path: Any, mock_upstream: MockProvider
) -> None:
    from keel.config import ModelConfig, Settings
    from keel.plugins import provider_factories
    from keel.server import create_app
    from keel.store import Store
    from tests.conftest import MASTER_KEY, ServerThread

    class Broken:
        name = "broken"

        def __init__(self, deployment: Any, settings: Any) -> None:
            pass

        async def chat(self, body: Any, headers: Any) -> Any:
            raise ZeroDivisionError("a bug")

        async def chat_stream(self, body: Any, headers: Any) -> Any:
            raise ZeroDivisionError("a bug")

        async def aclose(self) -> None:
            return None

    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/k.db",
        master_key=MASTER_KEY,
        data_dir=str(tmp_path),
        trace_writer="thread",
        models=(ModelConfig(name="broken", provider="broken"),),
    )
    app = create_app(
        settings,
        store=Store.from_url(settings.database_url),
        factories={**provider_factories(), "broken": Broken},
    )
    server = ServerThread(app).start()
    try:
        k = Keel(server, app, "sqlite")
        for stream in (False, True):
            resp = post(k, {"model": "broken", "messages": MSGS, "stream": stream})
            assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"
            assert "Traceback" not in resp.text and "a bug" not in resp.text
            trace = k.wait_for_trace(resp.headers["x-keel-trace-id"])
            assert trace["status"] == "error" and "internal_error" in trace["error"]
        k.http.close()
    finally:
        server.stop()
