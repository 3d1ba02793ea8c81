"""OTLP ingest: POST /v1/traces with spans made by the real OpenTelemetry SDK and its OTLP/HTTP exporter.

Pins the mapping of the GenAI semantic conventions (current and older names) and of OpenInference
onto keel's spans, the OTLP/HTTP wire behaviour (protobuf, JSON, gzip, errors, partial success,
back-pressure), the join with gateway spans through ``traceparent``, and that every accepted span
is stored, also across a SIGTERM.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from google.rpc import status_pb2
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from sqlalchemy import text

from keel.config import Settings
from keel.pricing import price
from keel.server import create_app
from keel.store import Store
from keel.testing import MockProvider
from keel.types import Usage
from tests import conftest
from tests.conftest import MASTER_KEY, Keel, ServerThread, free_port

PROTOBUF = {"content-type": "application/x-protobuf"}


# -- helpers ----------------------------------------------------------------------------------------


class Recorder:
    """An SDK tracer whose finished spans are kept in memory, then exported with the real OTLP exporter."""

    def __init__(self, project: str | None = None, **resource: Any) -> None:
        attrs: dict[str, Any] = {"service.name": "test-app", **resource}
        if project:
            attrs["keel.project"] = project
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.tracer = self.provider.get_tracer("tests.otlp")

    @property
    def spans(self) -> Sequence[ReadableSpan]:
        return self.memory.get_finished_spans()

    def export(self, keel: Keel, key: str | None = None, compression: Compression | None = None) -> None:
        exporter = OTLPSpanExporter(
            endpoint=f"{keel.url}/v1/traces",
            headers={"authorization": f"Bearer {key or keel.master_key}"},
            compression=compression,
            timeout=30,
        )
        try:
            assert exporter.export(self.spans) == SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()

    def payload(self) -> bytes:
        return bytes(encode_spans(self.spans).SerializeToString())


def status_of(r: httpx.Response) -> status_pb2.Status:
    st = status_pb2.Status()
    st.ParseFromString(r.content)
    return st


def hex_trace(span: Any) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def hex_span(span: Any) -> str:
    return f"{span.get_span_context().span_id:016x}"


def wait_spans(keel: Keel, trace_id: str, n: int, timeout: float = 20.0) -> dict[str, Any]:
    """The trace once ``n`` of its spans are stored (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    t: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = keel.http.get(f"/api/traces/{trace_id}")
        if r.status_code == 200:
            t = r.json()
            if len(t["spans"]) >= n:
                return t
        time.sleep(0.05)
    raise AssertionError(f"trace {trace_id}: {len(t.get('spans', []))} of {n} spans stored after {timeout}s")


def by_name(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in trace["spans"]}


def count_spans(keel_or_store: Any, project_id: str) -> int:
    store = getattr(keel_or_store, "store", keel_or_store)
    with store.engine.connect() as c:
        return int(
            c.execute(text("SELECT count(*) FROM spans WHERE project_id = :p"), {"p": project_id}).scalar()
        )


def project_id(keel: Keel, name: str) -> str:
    proj = keel.store.get_project(name)
    assert proj is not None, name
    return str(proj["id"])


# -- mapping: GenAI semantic conventions ---------------------------------------------------------------


def test_genai_semconv_spans_become_a_tree_with_kinds_tokens_cost_and_io(keel: Keel) -> None:
    rec = Recorder(project="otlp-genai-" + uuid.uuid4().hex[:6])
    t = rec.tracer
    with t.start_as_current_span("invoke_agent trip-planner") as root:
        root.set_attribute("gen_ai.operation.name", "invoke_agent")
        root.set_attribute("gen_ai.agent.name", "trip-planner")
        root.set_attribute("gen_ai.agent.id", "agent-7")
        root.set_attribute("gen_ai.conversation.id", "conv-42")
        root.set_attribute("enduser.id", "alice")
        root.set_attribute("tag.tags", ["otlp", "genai"])
        root.set_attribute("app.custom.flag", True)
        with t.start_as_current_span("chat gpt-4o-mini") as chat:
            chat.set_attribute("gen_ai.operation.name", "chat")
            chat.set_attribute("gen_ai.provider.name", "openai")
            chat.set_attribute("gen_ai.request.model", "gpt-4o-mini")
            chat.set_attribute("gen_ai.response.model", "gpt-4o-mini-2024-07-18")
            chat.set_attribute("gen_ai.request.temperature", 0.2)
            chat.set_attribute("gen_ai.usage.input_tokens", 1200)
            chat.set_attribute("gen_ai.usage.output_tokens", 300)
            chat.set_attribute("gen_ai.usage.cache_read.input_tokens", 200)
            chat.set_attribute("gen_ai.usage.reasoning.output_tokens", 50)
            chat.set_attribute("gen_ai.usage.cache_creation.input_tokens", 10)
            chat.set_attribute(
                "gen_ai.system_instructions",
                orjson.dumps([{"type": "text", "content": "Be brief."}]).decode(),
            )
            chat.set_attribute(
                "gen_ai.input.messages",
                orjson.dumps(
                    [{"role": "user", "parts": [{"type": "text", "content": "Paris in May?"}]}]
                ).decode(),
            )
            chat.set_attribute(
                "gen_ai.output.messages",
                orjson.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [
                                {"type": "text", "content": "Checking the weather."},
                                {
                                    "type": "tool_call",
                                    "id": "call_1",
                                    "name": "weather",
                                    "arguments": {"city": "Paris"},
                                },
                            ],
                            "finish_reason": "tool_call",
                        }
                    ]
                ).decode(),
            )
        with t.start_as_current_span("execute_tool weather") as tool:
            tool.set_attribute("gen_ai.operation.name", "execute_tool")
            tool.set_attribute("gen_ai.tool.name", "weather")
            tool.set_attribute("gen_ai.tool.call.id", "call_1")
            tool.set_attribute("gen_ai.tool.call.arguments", '{"city": "Paris"}')
            tool.set_attribute("gen_ai.tool.call.result", '{"temp_c": 21}')
        with t.start_as_current_span("embeddings text-embedding-3-small") as emb:
            emb.set_attribute("gen_ai.operation.name", "embeddings")
            emb.set_attribute("gen_ai.provider.name", "openai")
            emb.set_attribute("gen_ai.request.model", "text-embedding-3-small")
            emb.set_attribute("gen_ai.usage.input_tokens", 40)
        with t.start_as_current_span("retrieval docs") as ret:
            ret.set_attribute("gen_ai.operation.name", "retrieval")
            ret.set_attribute("gen_ai.retrieval.query.text", "paris weather")
        with t.start_as_current_span("chat broken") as bad:
            bad.set_attribute("gen_ai.operation.name", "chat")
            bad.set_attribute("gen_ai.request.model", "gpt-4o-mini")
            bad.record_exception(RuntimeError("upstream said no"))
            bad.set_status(Status(StatusCode.ERROR))
    rec.export(keel)

    tid = hex_trace(root)
    tr = wait_spans(keel, tid, 6)
    spans = by_name(tr)
    assert tr["name"] == "invoke_agent trip-planner"
    assert tr["session_id"] == "conv-42" and tr["user"] == "alice" and tr["tags"] == ["genai", "otlp"]
    assert tr["project_id"] == project_id(keel, rec.provider.resource.attributes["keel.project"])  # type: ignore[arg-type]
    assert tr["status"] == "error" and tr["error"] == "RuntimeError: upstream said no"

    agent = spans["invoke_agent trip-planner"]
    assert agent["kind"] == "agent" and agent["parent_span_id"] is None
    assert agent["attributes"]["app.custom.flag"] is True  # unknown attributes are kept
    assert agent["attributes"]["gen_ai.agent.id"] == "agent-7"
    assert agent["attributes"]["otel.resource"]["service.name"] == "test-app"
    assert agent["attributes"]["otel.scope"] == "tests.otlp"

    llm = spans["chat gpt-4o-mini"]
    assert llm["kind"] == "llm" and llm["parent_span_id"] == hex_span(root)
    assert llm["requested_model"] == "gpt-4o-mini" and llm["model"] == "gpt-4o-mini-2024-07-18"
    assert llm["provider"] == "openai"
    assert (llm["input_tokens"], llm["output_tokens"]) == (1200, 300)
    assert llm["attributes"]["keel.usage.cached_input_tokens"] == 200
    assert llm["attributes"]["keel.usage.reasoning_tokens"] == 50
    assert llm["attributes"]["gen_ai.usage.cache_creation.input_tokens"] == 10
    expected = price("gpt-4o-mini-2024-07-18", "openai", Usage(1200, 300, cached_input_tokens=200))
    assert expected and llm["cost_usd"] == pytest.approx(expected) and llm["priced"] is True
    assert llm["input"] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Paris in May?"},
        ]
    }
    assert llm["output"] == {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_call",
                "message": {
                    "role": "assistant",
                    "content": "Checking the weather.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
            }
        ]
    }
    assert "gen_ai.input.messages" not in llm["attributes"]  # moved to input, not stored twice
    assert llm["attributes"]["gen_ai.request.temperature"] == 0.2

    tool = spans["execute_tool weather"]
    assert tool["kind"] == "tool" and tool["input"] == {"city": "Paris"} and tool["output"] == {"temp_c": 21}
    assert spans["embeddings text-embedding-3-small"]["kind"] == "embedding"
    assert spans["embeddings text-embedding-3-small"]["cost_usd"] == pytest.approx(
        price("text-embedding-3-small", "openai", Usage(40, None))
    )
    ret = spans["retrieval docs"]
    assert ret["kind"] == "retriever" and ret["input"] == "paris weather"
    broken = spans["chat broken"]
    assert broken["status"] == "error" and broken["error"] == "RuntimeError: upstream said no"
    assert broken["attributes"]["otel.events"][0]["name"] == "exception"
    assert tr["input_tokens"] == 1240 and tr["output_tokens"] == 300
    assert tr["cost_usd"] == pytest.approx(
        llm["cost_usd"] + spans["embeddings text-embedding-3-small"]["cost_usd"]
    )


def test_older_genai_names_and_flattened_prompts(keel: Keel) -> None:
    rec = Recorder()
    with rec.tracer.start_as_current_span("openai.chat") as sp:
        sp.set_attribute("gen_ai.system", "openai")
        sp.set_attribute("gen_ai.request.model", "gpt-4o-mini")
        sp.set_attribute("gen_ai.usage.prompt_tokens", 100)
        sp.set_attribute("gen_ai.usage.completion_tokens", 20)
        sp.set_attribute("gen_ai.prompt.0.role", "system")
        sp.set_attribute("gen_ai.prompt.0.content", "You are terse.")
        sp.set_attribute("gen_ai.prompt.1.role", "user")
        sp.set_attribute("gen_ai.prompt.1.content", "hi")
        sp.set_attribute("gen_ai.completion.0.role", "assistant")
        sp.set_attribute("gen_ai.completion.0.content", "hello")
        sp.set_attribute("gen_ai.completion.0.finish_reason", "stop")
        sp.set_attribute("session.id", "s-old")
        sp.set_attribute("user.id", "bob")
    with rec.tracer.start_as_current_span("legacy events") as ev:
        ev.set_attribute("gen_ai.system", "anthropic")
        ev.set_attribute("gen_ai.request.model", "claude-3-5-haiku-latest")
        ev.add_event("gen_ai.content.prompt", {"gen_ai.prompt": '[{"role": "user", "content": "ping"}]'})
        ev.add_event(
            "gen_ai.content.completion", {"gen_ai.completion": '[{"role": "assistant", "content": "pong"}]'}
        )
    rec.export(keel)

    s = wait_spans(keel, hex_trace(sp), 1)["spans"][0]
    assert (
        s["kind"] == "llm"
        and s["provider"] == "openai"
        and (s["input_tokens"], s["output_tokens"]) == (100, 20)
    )
    assert s["cost_usd"] == pytest.approx(price("gpt-4o-mini", "openai", Usage(100, 20)))
    assert s["input"] == {
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    }
    assert s["output"] == {
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}
        ]
    }
    assert s["user"] == "bob"
    assert wait_spans(keel, hex_trace(sp), 1)["session_id"] == "s-old"
    e = wait_spans(keel, hex_trace(ev), 1)["spans"][0]
    assert e["kind"] == "llm" and e["provider"] == "anthropic"
    assert e["input"] == {"messages": [{"role": "user", "content": "ping"}]}
    assert e["output"]["choices"][0]["message"] == {"role": "assistant", "content": "pong"}
    assert "otel.events" not in e["attributes"]  # the message events became input/output


# -- mapping: OpenInference ---------------------------------------------------------------------------


def test_openinference_spans_map_onto_every_kind(keel: Keel) -> None:
    rec = Recorder()
    t = rec.tracer
    with t.start_as_current_span("rag-pipeline") as root:
        root.set_attribute("openinference.span.kind", "CHAIN")
        root.set_attribute("input.value", "what is keel?")
        root.set_attribute("input.mime_type", "text/plain")
        root.set_attribute("output.value", '{"answer": "an LLMOps platform"}')
        root.set_attribute("output.mime_type", "application/json")
        root.set_attribute("session.id", "sess-oi")
        root.set_attribute("user.id", "carol")
        root.set_attribute("tag.tags", ["rag", "prod"])
        root.set_attribute("metadata", '{"tenant": "acme"}')
        with t.start_as_current_span("embed query") as emb:
            emb.set_attribute("openinference.span.kind", "EMBEDDING")
            emb.set_attribute("embedding.model_name", "text-embedding-3-small")
            emb.set_attribute("embedding.embeddings.0.embedding.text", "what is keel?")
        with t.start_as_current_span("vector search") as ret:
            ret.set_attribute("openinference.span.kind", "RETRIEVER")
            ret.set_attribute("input.value", "what is keel?")
            ret.set_attribute("retrieval.documents.0.document.id", "d1")
            ret.set_attribute("retrieval.documents.0.document.content", "keel is a gateway")
            ret.set_attribute("retrieval.documents.0.document.score", 0.9)
            ret.set_attribute("retrieval.documents.0.document.metadata", '{"src": "readme"}')
            ret.set_attribute("retrieval.documents.1.document.id", "d2")
            ret.set_attribute("retrieval.documents.1.document.content", "keel stores traces")
        with t.start_as_current_span("rerank") as rr:
            rr.set_attribute("openinference.span.kind", "RERANKER")
            rr.set_attribute("reranker.query", "what is keel?")
            rr.set_attribute("reranker.input_documents.0.document.id", "d1")
            rr.set_attribute("reranker.output_documents.0.document.id", "d1")
            rr.set_attribute("reranker.output_documents.0.document.score", 0.95)
        with t.start_as_current_span("ChatCompletion") as llm:
            llm.set_attribute("openinference.span.kind", "LLM")
            llm.set_attribute("llm.model_name", "gpt-4o-mini")
            llm.set_attribute("llm.provider", "openai")
            llm.set_attribute("llm.invocation_parameters", '{"temperature": 0}')
            llm.set_attribute("llm.input_messages.0.message.role", "system")
            llm.set_attribute("llm.input_messages.0.message.content", "Use the context.")
            llm.set_attribute("llm.input_messages.1.message.role", "user")
            llm.set_attribute("llm.input_messages.1.message.contents.0.message_content.type", "text")
            llm.set_attribute("llm.input_messages.1.message.contents.0.message_content.text", "what is keel?")
            llm.set_attribute("llm.output_messages.0.message.role", "assistant")
            llm.set_attribute("llm.output_messages.0.message.tool_calls.0.tool_call.id", "c9")
            llm.set_attribute("llm.output_messages.0.message.tool_calls.0.tool_call.function.name", "lookup")
            llm.set_attribute(
                "llm.output_messages.0.message.tool_calls.0.tool_call.function.arguments", '{"q": 1}'
            )
            llm.set_attribute("llm.token_count.prompt", 500)
            llm.set_attribute("llm.token_count.completion", 40)
            llm.set_attribute("llm.token_count.prompt_details.cache_read", 100)
            llm.set_attribute("llm.token_count.completion_details.reasoning", 7)
        with t.start_as_current_span("lookup") as tool:
            tool.set_attribute("openinference.span.kind", "TOOL")
            tool.set_attribute("tool.name", "lookup")
            tool.set_attribute("input.value", '{"q": 1}')
            tool.set_attribute("output.value", "found")
        for kind in ("GUARDRAIL", "EVALUATOR", "AGENT"):
            with t.start_as_current_span(kind.lower()) as s:
                s.set_attribute("openinference.span.kind", kind)
        marker = t.start_span("cache hit", start_time=1_700_000_000_000_000_000)
        marker.end(end_time=1_700_000_000_000_000_000)
    rec.export(keel)

    tr = wait_spans(keel, hex_trace(root), 9)
    spans = by_name(tr)
    assert tr["name"] == "rag-pipeline" and tr["session_id"] == "sess-oi" and tr["user"] == "carol"
    assert tr["tags"] == ["prod", "rag"]
    chain = spans["rag-pipeline"]
    assert chain["kind"] == "chain"
    assert chain["input"] == "what is keel?" and chain["output"] == {"answer": "an LLMOps platform"}
    assert chain["attributes"]["keel.metadata"] == {"tenant": "acme"}
    emb_s = spans["embed query"]
    assert emb_s["kind"] == "embedding" and emb_s["input"] == {"input": ["what is keel?"]}
    ret_s = spans["vector search"]
    assert ret_s["kind"] == "retriever" and ret_s["input"] == "what is keel?"
    assert ret_s["output"] == {
        "documents": [
            {"id": "d1", "content": "keel is a gateway", "score": 0.9, "metadata": {"src": "readme"}},
            {"id": "d2", "content": "keel stores traces"},
        ]
    }
    rr_s = spans["rerank"]
    assert rr_s["kind"] == "reranker"
    assert rr_s["input"] == {"query": "what is keel?", "documents": [{"id": "d1"}]}
    assert rr_s["output"] == {"documents": [{"id": "d1", "score": 0.95}]}
    llm_s = spans["ChatCompletion"]
    assert llm_s["kind"] == "llm" and llm_s["model"] == "gpt-4o-mini" and llm_s["provider"] == "openai"
    assert (llm_s["input_tokens"], llm_s["output_tokens"]) == (500, 40)
    assert llm_s["cost_usd"] == pytest.approx(
        price("gpt-4o-mini", "openai", Usage(500, 40, cached_input_tokens=100))
    )
    assert llm_s["attributes"]["keel.usage.reasoning_tokens"] == 7
    assert llm_s["input"] == {
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Use the context."},
            {"role": "user", "content": [{"type": "text", "text": "what is keel?"}]},
        ],
    }
    assert llm_s["output"]["choices"][0]["message"]["tool_calls"] == [
        {"id": "c9", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    ]
    tool_s = spans["lookup"]
    assert tool_s["kind"] == "tool" and tool_s["input"] == {"q": 1} and tool_s["output"] == "found"
    assert spans["guardrail"]["kind"] == "guardrail"
    assert spans["evaluator"]["kind"] == "evaluator"
    assert spans["agent"]["kind"] == "agent"
    assert spans["cache hit"]["kind"] == "event"


# -- the wire: encodings, auth, errors ----------------------------------------------------------------


def test_gzip_protobuf_and_a_virtual_keys_project(keel: Keel) -> None:
    project = "otlp-key-" + uuid.uuid4().hex[:6]
    key = keel.create_key(project=project)
    rec = Recorder(project="ignored-for-virtual-keys")
    with rec.tracer.start_as_current_span("job") as sp:
        sp.set_attribute("gen_ai.request.model", "gpt-4o-mini")
    rec.export(keel, key=key["key"], compression=Compression.Gzip)
    tr = wait_spans(keel, hex_trace(sp), 1)
    assert tr["project_id"] == key["project_id"] and tr["key_id"] == key["id"]
    assert keel.store.get_project("ignored-for-virtual-keys") is None
    # a virtual key only sees its own project's traces
    r = httpx.get(f"{keel.url}/api/traces/{hex_trace(sp)}", headers={"authorization": f"Bearer {key['key']}"})
    assert r.status_code == 200


def _json_export(spans: list[dict[str, Any]], project: str | None = None) -> dict[str, Any]:
    res_attrs = [{"key": "service.name", "value": {"stringValue": "json-app"}}]
    if project:
        res_attrs.append({"key": "keel.project", "value": {"stringValue": project}})
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": res_attrs},
                "scopeSpans": [{"scope": {"name": "manual"}, "spans": spans}],
            }
        ]
    }


def test_otlp_json_with_hex_ids_string_ints_gzip_and_partial_success(keel: Keel) -> None:
    tid, root_id, child_id = uuid.uuid4().hex, uuid.uuid4().hex[:16], uuid.uuid4().hex[:16]
    now = time.time_ns()
    spans = [
        {
            "traceId": tid,
            "spanId": root_id,
            "name": "json root",
            "kind": 2,
            "startTimeUnixNano": str(now - 5_000_000),
            "endTimeUnixNano": str(now),
            "attributes": [
                {"key": "user.id", "value": {"stringValue": "dave"}},
                {"key": "tag.tags", "value": {"arrayValue": {"values": [{"stringValue": "json"}]}}},
                {"key": "retries", "value": {"intValue": "3"}},
                {
                    "key": "nested",
                    "value": {"kvlistValue": {"values": [{"key": "a", "value": {"doubleValue": 1.5}}]}},
                },
            ],
            "status": {"code": 1},
        },
        {
            "traceId": tid,
            "spanId": child_id,
            "parentSpanId": root_id,
            "name": "chat",
            "startTimeUnixNano": now - 4_000_000,
            "endTimeUnixNano": now - 1_000_000,
            "attributes": [
                {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o-mini"}},
                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "10"}},
                {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 5}},
            ],
            "status": {"code": 2, "message": "rate limited"},
        },
        {"traceId": "nothex", "spanId": "00", "name": "broken", "startTimeUnixNano": "1"},
    ]
    body = gzip.compress(orjson.dumps(_json_export(spans)))
    r = keel.http.post(
        "/v1/traces", content=body, headers={"content-type": "application/json", "content-encoding": "gzip"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    ps = r.json()["partialSuccess"]
    assert ps["rejectedSpans"] == "1" and "broken" in ps["errorMessage"]
    tr = wait_spans(keel, tid, 2)
    spans_by = by_name(tr)
    assert tr["name"] == "json root" and tr["user"] == "dave" and tr["tags"] == ["json"]
    root = spans_by["json root"]
    assert root["attributes"]["retries"] == 3 and root["attributes"]["nested"] == {"a": 1.5}
    assert root["attributes"]["otel.span_kind"] == "server"
    chat = spans_by["chat"]
    assert chat["parent_span_id"] == root_id and chat["kind"] == "llm" and chat["status"] == "error"
    assert chat["error"] == "rate limited" and (chat["input_tokens"], chat["output_tokens"]) == (10, 5)
    assert chat["latency_ms"] == pytest.approx(3.0)

    # an export with nothing wrong answers an empty ExportTraceServiceResponse
    ok = [{**spans[0], "spanId": uuid.uuid4().hex[:16], "traceId": uuid.uuid4().hex}]
    r = keel.http.post(
        "/v1/traces", content=orjson.dumps(_json_export(ok)), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200 and r.json() == {}


def test_protobuf_response_and_error_statuses(keel: Keel) -> None:
    rec = Recorder()
    with rec.tracer.start_as_current_span("pb"):
        pass
    payload = rec.payload()
    r = keel.http.post("/v1/traces", content=payload, headers=PROTOBUF)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    resp = ExportTraceServiceResponse()
    resp.ParseFromString(r.content)
    assert not resp.HasField("partial_success")

    # 401: no key, a bad key (protobuf Status body; JSON Status for JSON requests)
    r = httpx.post(f"{keel.url}/v1/traces", content=payload, headers=PROTOBUF)
    assert r.status_code == 401 and status_of(r).code == 16
    r = httpx.post(
        f"{keel.url}/v1/traces",
        content=b"{}",
        headers={"content-type": "application/json", "authorization": "Bearer nope"},
    )
    assert r.status_code == 401 and r.json() == {"code": 16, "message": "invalid API key"}
    # 415: content type, content encoding
    r = keel.http.post("/v1/traces", content=payload, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "content type" in r.json()["message"]
    r = keel.http.post("/v1/traces", content=payload, headers={**PROTOBUF, "content-encoding": "br"})
    assert r.status_code == 415 and "encoding" in status_of(r).message
    # 400: undecodable bodies
    r = keel.http.post("/v1/traces", content=b"\xff\xff\xff garbage", headers=PROTOBUF)
    assert r.status_code == 400 and status_of(r).code == 3
    r = keel.http.post("/v1/traces", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = keel.http.post(
        "/v1/traces", content=b'{"resourceSpans": 5}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    r = keel.http.post("/v1/traces", content=b"not gzip", headers={**PROTOBUF, "content-encoding": "gzip"})
    assert r.status_code == 400
    # 413: too large as sent, and too large once inflated (a gzip bomb is cut off, not inflated)
    limit = keel.app.state.settings.max_request_bytes
    r = keel.http.post("/v1/traces", content=b"\0" * (limit + 1), headers=PROTOBUF)
    assert r.status_code == 413
    bomb = gzip.compress(b"\0" * (limit + 1024))
    assert len(bomb) < limit // 100
    r = keel.http.post("/v1/traces", content=bomb, headers={**PROTOBUF, "content-encoding": "gzip"})
    assert r.status_code == 413 and status_of(r).code == 8


# -- app spans and gateway spans in one tree ---------------------------------------------------------


def test_app_span_and_gateway_span_join_through_traceparent(keel: Keel) -> None:
    rec = Recorder()
    client = openai.OpenAI(base_url=f"{keel.url}/v1", api_key=keel.master_key, max_retries=0)
    with rec.tracer.start_as_current_span("answer question") as app_span:
        app_span.set_attribute("openinference.span.kind", "CHAIN")
        app_span.set_attribute("session.id", "sess-join")
        carrier: dict[str, str] = {}
        inject(carrier, context=otel_trace.set_span_in_context(app_span))
        resp = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=carrier
        )
        assert resp.headers["x-keel-trace-id"] == hex_trace(app_span)
    client.close()
    rec.export(keel)

    tr = wait_spans(keel, hex_trace(app_span), 2)
    spans = by_name(tr)
    gw = next(s for s in tr["spans"] if s["name"] != "answer question")
    assert gw["kind"] == "llm" and gw["parent_span_id"] == hex_span(app_span)
    assert gw["input_tokens"] and gw["cost_usd"] is not None
    assert spans["answer question"]["parent_span_id"] is None
    assert tr["name"] == "answer question" and tr["span_count"] == 2 and tr["session_id"] == "sess-join"
    assert tr["model"] == "gpt-4o-mini" and tr["input_tokens"] == gw["input_tokens"]


# -- nothing lost -------------------------------------------------------------------------------------


def _batch_payload(n: int, project: str) -> bytes:
    rec = Recorder(project=project)
    for i in range(n):
        with rec.tracer.start_as_current_span(f"root {i}"):
            with rec.tracer.start_as_current_span("chat") as c:
                c.set_attribute("gen_ai.operation.name", "chat")
                c.set_attribute("gen_ai.request.model", "gpt-4o-mini")
                c.set_attribute("gen_ai.usage.input_tokens", 10)
                c.set_attribute("gen_ai.usage.output_tokens", 2)
    return rec.payload()


def test_every_accepted_span_is_stored_under_concurrent_exports(keel: Keel) -> None:
    project = "otlp-n-" + uuid.uuid4().hex[:6]
    payloads = [_batch_payload(100, project) for _ in range(12)]  # 12 exports x 200 spans
    errors: list[str] = []

    def send(chunk: list[bytes]) -> None:
        with httpx.Client(base_url=keel.url, headers={"authorization": f"Bearer {keel.master_key}"}) as c:
            for p in chunk:
                r = c.post("/v1/traces", content=p, headers=PROTOBUF)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=send, args=(payloads[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    pid = project_id(keel, project)
    deadline = time.monotonic() + 30
    while count_spans(keel, pid) < 2400 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count_spans(keel, pid) == 2400
    # a retried export stores nothing twice
    writer = keel.app.state.writer
    written = writer.stats.written
    assert keel.http.post("/v1/traces", content=payloads[0], headers=PROTOBUF).status_code == 200
    while writer.stats.written < written + 200 and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    assert count_spans(keel, pid) == 2400


def test_back_pressure_is_all_or_nothing_with_retry_after(
    mock_upstream: MockProvider, tmp_path: Path
) -> None:
    # a queue of 50 (5 kept for the gateway) and a writer held back until shutdown: the queue only fills
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/keel.db",
        master_key=MASTER_KEY,
        data_dir=str(tmp_path),
        models=conftest.test_models(mock_upstream),
        trace_queue_size=50,
        trace_batch_size=100_000,
        trace_flush_interval_s=3600,
    )
    app = create_app(settings, store=Store.from_url(settings.database_url))
    server = ServerThread(app).start()
    keel = Keel(server, app, "sqlite")
    project = "otlp-bp-" + uuid.uuid4().hex[:6]
    try:
        fits = _batch_payload(20, project)  # 40 spans
        assert keel.http.post("/v1/traces", content=fits, headers=PROTOBUF).status_code == 200
        more = _batch_payload(5, project)  # 10 more: 50 > 45
        r = keel.http.post("/v1/traces", content=more, headers=PROTOBUF)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        st = status_pb2.Status()
        st.ParseFromString(r.content)
        assert st.code == 14 and "retry" in st.message
        r = keel.http.post("/v1/traces", content=more, headers={**PROTOBUF, "content-encoding": "identity"})
        assert r.status_code == 503  # still full: nothing of the refused export was queued
        never = _batch_payload(30, project)  # 60 spans: more than the queue ever takes
        r = keel.http.post("/v1/traces", content=never, headers=PROTOBUF)
        assert r.status_code == 413 and "smaller batches" in status_of(r).message
        # the gateway still has its share of the queue
        reply = keel.http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
        )
        assert reply.status_code == 200
        metrics = keel.http.get("/metrics").text
        assert "keel_otlp_exports_refused_total 2.0" in metrics
        assert "keel_otlp_spans_accepted_total 40.0" in metrics
        assert "keel_trace_dropped_total 0.0" in metrics
    finally:
        keel.http.close()
        server.stop()  # drains the queue
    pid = project_id(keel, project)
    assert count_spans(keel, pid) == 40
    assert keel.store.get_trace(reply.headers["x-keel-trace-id"]) is not None


KEEL = [sys.executable, "-m", "keel.cli"]


def _wait_health(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"keel exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("keel did not become healthy")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_n_spans_sent_n_stored_across_sigterm(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    port = free_port()
    # a long flush interval and a huge batch: without the drain on SIGTERM nothing would be written
    (tmp_path / "keel.yaml").write_text("trace_flush_interval_s: 60\ntrace_batch_size: 100000\n")
    env = {**os.environ, "KEEL_PORT": str(port), "KEEL_MASTER_KEY": "sk-master-sigterm"}
    if backend == "postgresql":
        env["KEEL_DATABASE_URL"] = request.getfixturevalue("pg_database")
    project = "otlp-sigterm-" + uuid.uuid4().hex[:6]
    payloads = [_batch_payload(150, project) for _ in range(8)]  # 2400 spans
    proc = subprocess.Popen(
        [*KEEL, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, proc)
        with httpx.Client(headers={"authorization": "Bearer sk-master-sigterm"}, timeout=30) as c:
            for p in payloads:
                assert c.post(url + "/v1/traces", content=p, headers=PROTOBUF).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM), err
    store = Store.from_url(env.get("KEEL_DATABASE_URL") or f"sqlite:///{tmp_path}/.keel/keel.db")
    try:
        proj = store.get_project(project)
        assert proj is not None
        assert count_spans(store, proj["id"]) == 2400
    finally:
        store.close()


def test_writer_process_encoding_round_trips_every_field() -> None:
    """The writer child rebuilds records positionally: every field must survive the trip."""
    from keel.tracing.process_writer import decode_records, encode_records
    from keel.types import SpanRecord

    full = SpanRecord(
        trace_id="a" * 32,
        span_id="b" * 16,
        name="n",
        kind="llm",
        start_time=1.5,
        end_time=2.5,
        status="error",
        parent_span_id="c" * 16,
        project_id="p",
        key_id="k",
        team_id="t",
        error="e",
        status_code=429,
        model="m",
        requested_model="rm",
        provider="openai",
        deployment="d",
        usage=Usage(1, 2, 3, 4, True),
        cost_usd=0.5,
        price_override=(1.0, 2.0),
        ttft_ms=3.0,
        user="u",
        session_id="s",
        prompt_name="pn",
        prompt_version=7,
        tags=["x"],
        metadata={"a": 1},
        input={"messages": []},
        output="o",
        attributes={"k": [1, 2]},
        stream=True,
    )
    assert decode_records(encode_records([full, SpanRecord("1" * 32, "2" * 16, "m", "chain", 0, 0)])) == [
        full,
        SpanRecord("1" * 32, "2" * 16, "m", "chain", 0, 0),
    ]


def test_drain_budget_follows_the_writers_measured_rate() -> None:
    """Ingest keeps no more queued than the writer stores in DRAIN_BUDGET_S (so a SIGTERM drain finishes)."""
    from types import SimpleNamespace

    from keel.server.otlp import DRAIN_BUDGET_S, MIN_ALLOWANCE, DrainBudget

    now = [0.0]
    writer = SimpleNamespace(stats=SimpleNamespace(written=0), depth=0)
    b = DrainBudget(writer, clock=lambda: now[0])
    assert b.allowance() == MIN_ALLOWANCE  # nothing measured yet
    now[0], writer.depth = 2.0, 5000
    writer.stats.written = 16_000  # busy for 2 s: 8,000 spans/s
    assert b.allowance() == int(8000 * DRAIN_BUDGET_S)
    now[0], writer.depth = 3.0, 0
    writer.stats.written = 16_100  # idle spell: not a measure of capacity
    assert b.allowance() == int(8000 * DRAIN_BUDGET_S)
    now[0], writer.depth = 4.0, 100
    writer.stats.written = 17_100  # a slower second: the estimate moves halfway
    assert b.allowance() == max(MIN_ALLOWANCE, int(4500 * DRAIN_BUDGET_S))
