"""The keel SDK (keel.sdk): spans from @observe / span(), export over real OTLP/HTTP, gateway propagation.

The first half exports to a capture server (a real HTTP server that decodes the protobuf with
opentelemetry-proto, and can hang or refuse on demand); the second half runs a real keel (both
backends) and checks that an instrumented app and its gateway calls land in one trace.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import keel.sdk as sdk
from tests.conftest import Keel, free_port


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


class Capture:
    """A real OTLP/HTTP receiver. ``hold`` blocks each request until released; ``refuse`` answers
    that many requests with 503 first."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.hold = threading.Event()
        self.released = threading.Event()
        self.refuse = 0
        self.reject = 0  # spans to report as rejected in an OTLP partial_success
        self.lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if capture.hold.is_set():
                    capture.released.wait(120)
                with capture.lock:
                    capture.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
                    )
                    if capture.refuse > 0:
                        capture.refuse -= 1
                        self.send_response(503)
                        self.send_header("retry-after", "0")
                        self.send_header("content-length", "0")
                        self.end_headers()
                        return
                    req = ExportTraceServiceRequest.FromString(body)
                    for rs in req.resource_spans:
                        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                capture.spans.append(
                                    {
                                        "name": s.name,
                                        "trace_id": s.trace_id.hex(),
                                        "span_id": s.span_id.hex(),
                                        "parent": s.parent_span_id.hex() or None,
                                        "attrs": {kv.key: _value(kv.value) for kv in s.attributes},
                                        "status": s.status.code,
                                        "status_message": s.status.message,
                                        "events": [e.name for e in s.events],
                                        "event_attrs": [
                                            {kv.key: _value(kv.value) for kv in e.attributes}
                                            for e in s.events
                                        ],
                                        "resource": resource,
                                        "scope": ss.scope.name,
                                        "duration_ns": s.end_time_unix_nano - s.start_time_unix_nano,
                                    }
                                )
                reply = ExportTraceServiceResponse()
                if capture.reject:
                    reply.partial_success.rejected_spans = capture.reject
                    reply.partial_success.error_message = "too old"
                out = reply.SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def by_name(self, name: str) -> dict[str, Any]:
        found = [s for s in self.spans if s["name"] == name]
        assert len(found) == 1, (name, [s["name"] for s in self.spans])
        return found[0]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    c = Capture()
    sdk.init(c.url, "sk-sdk-test", service_name="sdk-tests", project="shop", schedule_delay_s=0.05)
    try:
        yield c
    finally:
        sdk.shutdown(2)
        c.close()


def flushed(c: Capture) -> Capture:
    assert sdk.flush(10) is True
    return c


OK, ERROR = 1, 2  # OTLP status codes


def until(get: Any, ok: Any, timeout: float = 15.0) -> Any:
    """Poll ``get()`` until ``ok(value)`` (work finishing on a background thread); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met after {timeout}s: last value {value!r}")
        time.sleep(0.02)


# -- spans, kinds, I/O and propagation -----------------------------------------------------------------


def test_observe_builds_a_tree_with_kinds_io_and_propagated_attributes(capture: Capture) -> None:
    @sdk.observe(kind="tool")
    def weather(city: str, unit: str = "C") -> dict[str, Any]:
        return {"city": city, "temp": 21, "unit": unit}

    @sdk.observe(name="retrieve", kind="retriever")
    def retrieve(query: str) -> list[str]:
        return ["doc-1", "doc-2"]

    @sdk.observe()
    def agent(question: str) -> str:
        sdk.set_user("alice")
        sdk.set_session("sess-1")
        sdk.set_tags("prod", ["beta"])
        sdk.set_metadata({"tenant": "acme"}, plan="pro")
        docs = retrieve(question)
        w = weather("Paris")
        return f"{len(docs)} docs, {w['temp']} degrees"

    assert agent("what to wear?") == "2 docs, 21 degrees"
    flushed(capture)

    root = capture.by_name(
        "test_observe_builds_a_tree_with_kinds_io_and_propagated_attributes.<locals>.agent"
    )
    tool = capture.by_name(
        "test_observe_builds_a_tree_with_kinds_io_and_propagated_attributes.<locals>.weather"
    )
    ret = capture.by_name("retrieve")
    assert root["parent"] is None
    assert tool["parent"] == root["span_id"] and ret["parent"] == root["span_id"]
    assert {s["trace_id"] for s in capture.spans} == {root["trace_id"]}
    assert (root["attrs"]["openinference.span.kind"], tool["attrs"]["openinference.span.kind"]) == (
        "CHAIN",
        "TOOL",
    )
    assert ret["attrs"]["openinference.span.kind"] == "RETRIEVER"
    # arguments by parameter name (defaults included) as JSON; a str result as text
    assert json.loads(tool["attrs"]["input.value"]) == {"city": "Paris", "unit": "C"}
    assert tool["attrs"]["input.mime_type"] == "application/json"
    assert json.loads(tool["attrs"]["output.value"]) == {"city": "Paris", "temp": 21, "unit": "C"}
    assert root["attrs"]["output.value"] == "2 docs, 21 degrees"
    assert root["attrs"]["output.mime_type"] == "text/plain"
    assert json.loads(ret["attrs"]["output.value"]) == ["doc-1", "doc-2"]
    # set inside the root: on the root itself and on every child started after
    for s in (root, tool, ret):
        assert s["attrs"]["user.id"] == "alice"
        assert s["attrs"]["session.id"] == "sess-1"
        assert s["attrs"]["tag.tags"] == ["prod", "beta"]
        assert json.loads(s["attrs"]["metadata"]) == {"tenant": "acme", "plan": "pro"}
        assert s["status"] == OK
        assert s["resource"]["service.name"] == "sdk-tests" and s["resource"]["keel.project"] == "shop"
    # the export itself: OTLP/HTTP protobuf, the key as a bearer token
    req = capture.requests[0]
    assert req["path"] == "/v1/traces"
    assert req["headers"]["authorization"] == "Bearer sk-sdk-test"
    assert req["headers"]["content-type"] == "application/x-protobuf"


def test_context_set_inside_a_span_does_not_leak_to_its_siblings(capture: Capture) -> None:
    @sdk.observe(name="child")
    def child(n: int) -> int:
        if n == 1:
            sdk.set_user("only-in-first")
        return n

    @sdk.observe(name="root")
    def root() -> None:
        sdk.set_tags("outer")
        child(1)
        child(2)

    root()
    flushed(capture)
    first, second = sorted(
        (s for s in capture.spans if s["name"] == "child"), key=lambda s: s["attrs"]["input.value"]
    )
    assert first["attrs"]["user.id"] == "only-in-first"
    assert "user.id" not in second["attrs"]
    assert first["attrs"]["tag.tags"] == second["attrs"]["tag.tags"] == ["outer"]
    assert "user.id" not in capture.by_name("root")["attrs"]


def test_async_functions_and_tasks_nest_and_inherit_context(capture: Capture) -> None:
    @sdk.observe(name="fetch", kind="tool")
    async def fetch(i: int) -> int:
        await asyncio.sleep(0)
        if i == 0:
            sdk.set_tags(f"task-{i}")  # a task's own change stays in that task
        return i * 10

    @sdk.observe(name="fan-out", kind="agent")
    async def fan_out() -> list[int]:
        sdk.set_session("s-async")
        return list(await asyncio.gather(*(asyncio.create_task(fetch(i)) for i in range(3))))

    assert asyncio.run(fan_out()) == [0, 10, 20]
    flushed(capture)
    root = capture.by_name("fan-out")
    kids = [s for s in capture.spans if s["name"] == "fetch"]
    assert len(kids) == 3
    assert all(k["parent"] == root["span_id"] and k["attrs"]["session.id"] == "s-async" for k in kids)
    assert sorted(json.loads(k["attrs"]["output.value"]) for k in kids) == [0, 10, 20]
    assert sorted(k["attrs"].get("tag.tags", [None])[0] or "" for k in kids) == ["", "", "task-0"]
    assert root["attrs"]["openinference.span.kind"] == "AGENT"
    assert json.loads(root["attrs"]["output.value"]) == [0, 10, 20]


def test_context_reaches_threads_started_with_a_copied_context(capture: Capture) -> None:
    @sdk.observe(name="in-thread")
    def work() -> str:
        return "done"

    @sdk.observe(name="parent")
    def parent() -> None:
        sdk.set_user("bob")
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(work,))
        t.start()
        t.join()

    parent()
    flushed(capture)
    child = capture.by_name("in-thread")
    assert child["parent"] == capture.by_name("parent")["span_id"]
    assert child["attrs"]["user.id"] == "bob"


def test_generators_end_when_exhausted_or_closed(capture: Capture) -> None:
    @sdk.observe(name="tokens", kind="llm")
    def tokens(n: int) -> Iterator[str]:
        for i in range(n):
            yield f"t{i} "

    @sdk.observe(name="numbers")
    def numbers() -> Iterator[int]:
        yield from range(100)

    @sdk.observe(name="inner")
    def inner() -> int:
        return 1

    @sdk.observe(name="consumer")
    def consumer() -> list[str]:
        out = []
        for i, n in enumerate(numbers()):
            if i == 0:
                inner()  # called by the consumer between items: a child of the consumer, not the generator
            if n == 2:
                break
        out.extend(tokens(3))
        return out

    assert consumer() == ["t0 ", "t1 ", "t2 "]
    flushed(capture)
    root = capture.by_name("consumer")
    toks, nums = capture.by_name("tokens"), capture.by_name("numbers")
    assert toks["attrs"]["output.value"] == "t0 t1 t2 "  # text chunks read as the text
    assert json.loads(nums["attrs"]["output.value"]) == [0, 1, 2]  # closed early: what was consumed
    assert nums["status"] == OK and toks["status"] == OK
    assert toks["parent"] == nums["parent"] == capture.by_name("inner")["parent"] == root["span_id"]


def test_generator_and_async_generator_failures_are_recorded(capture: Capture) -> None:
    @sdk.observe(name="gen-fails")
    def gen_fails() -> Iterator[int]:
        yield 1
        raise KeyError("gone")

    @sdk.observe(name="agen")
    async def agen(n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    @sdk.observe(name="agen-fails")
    async def agen_fails() -> Any:
        yield "a"
        raise RuntimeError("stream broke")

    with pytest.raises(KeyError):
        list(gen_fails())

    async def main() -> tuple[list[int], list[int]]:
        full = [i async for i in agen(3)]
        partial = []
        g = agen(10)
        async for i in g:
            partial.append(i)
            if i == 1:
                break
        await g.aclose()
        with pytest.raises(RuntimeError, match="stream broke"):
            async for _ in agen_fails():
                pass
        return full, partial

    assert asyncio.run(main()) == ([0, 1, 2], [0, 1])
    flushed(capture)
    assert capture.by_name("gen-fails")["status"] == ERROR
    runs = sorted(
        (s for s in capture.spans if s["name"] == "agen"), key=lambda s: len(s["attrs"]["output.value"])
    )
    assert [json.loads(s["attrs"]["output.value"]) for s in runs] == [[0, 1], [0, 1, 2]]
    failed = capture.by_name("agen-fails")
    assert failed["status"] == ERROR and "RuntimeError: stream broke" in failed["status_message"]


def test_exceptions_are_recorded_and_reraised_unchanged(capture: Capture) -> None:
    boom = ValueError("bad input 42")

    @sdk.observe(name="fails", kind="tool")
    def fails() -> None:
        raise boom

    @sdk.observe(name="afails")
    async def afails() -> None:
        raise boom

    with pytest.raises(ValueError) as caught:
        fails()
    assert caught.value is boom
    with pytest.raises(ValueError) as caught2:
        asyncio.run(afails())
    assert caught2.value is boom
    with pytest.raises(ZeroDivisionError), sdk.span("block"):
        _ = 1 / 0
    flushed(capture)
    for name, etype in (("fails", "ValueError"), ("afails", "ValueError"), ("block", "ZeroDivisionError")):
        s = capture.by_name(name)
        assert s["status"] == ERROR and s["status_message"].startswith(etype)
        assert s["events"] == ["exception"]
        assert s["event_attrs"][0]["exception.type"] == etype
        assert "output.value" not in s["attrs"]


def test_span_context_manager_sync_and_async(capture: Capture) -> None:
    async def main() -> None:
        async with sdk.span("rerank", kind="reranker", input={"k": 2}) as s:
            s.set_output(["b", "a"])

    with sdk.span("pipeline") as outer:
        assert outer.trace_id is not None and re.fullmatch(r"[0-9a-f]{32}", outer.trace_id)
        assert sdk.current_span().span_id == outer.span_id
        with sdk.span("search", kind="retriever", input="shoes") as s:
            s.set_output(["doc-a"])
            s.set_attribute("retrieval.top_k", 5)
        asyncio.run(main())
    flushed(capture)
    outer_span = capture.by_name("pipeline")
    search, rerank = capture.by_name("search"), capture.by_name("rerank")
    assert search["parent"] == rerank["parent"] == outer_span["span_id"]
    assert search["attrs"]["input.value"] == "shoes" and json.loads(search["attrs"]["output.value"]) == [
        "doc-a"
    ]
    assert search["attrs"]["retrieval.top_k"] == 5
    assert rerank["attrs"]["openinference.span.kind"] == "RERANKER"
    assert json.loads(rerank["attrs"]["input.value"]) == {"k": 2}
    assert "input.value" not in outer_span["attrs"]  # nothing given, nothing captured


def test_llm_spans_carry_model_and_token_counts(capture: Capture) -> None:
    @sdk.observe(name="call-llm", kind="llm")
    def call_llm(prompt: str) -> dict[str, Any]:
        return {
            "model": "gpt-4o-mini",
            "choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        }

    @sdk.observe(name="manual", kind="LLM")
    def manual() -> str:
        h = sdk.current_span()
        h.set_model("claude-3-5-haiku-latest", provider="anthropic")
        h.set_usage(input_tokens=100, output_tokens=20)
        return "ok"

    call_llm("hello")
    manual()
    flushed(capture)
    a = capture.by_name("call-llm")["attrs"]
    assert (a["llm.model_name"], a["llm.token_count.prompt"], a["llm.token_count.completion"]) == (
        "gpt-4o-mini",
        12,
        3,
    )
    b = capture.by_name("manual")["attrs"]
    assert (b["llm.model_name"], b["llm.provider"]) == ("claude-3-5-haiku-latest", "anthropic")
    assert (b["llm.token_count.prompt"], b["llm.token_count.completion"], b["llm.token_count.total"]) == (
        100,
        20,
        120,
    )
    assert b["openinference.span.kind"] == "LLM"


def test_capture_flags_and_size_cap() -> None:
    c = Capture()
    sdk.init(c.url, "k", capture_input=False, max_io_chars=100, schedule_delay_s=0.05)
    try:

        @sdk.observe(name="secret")
        def secret(password: str) -> str:
            return "x" * 500

        @sdk.observe(name="opt-in", capture_input=True, capture_output=False)
        def opt_in(a: int) -> int:
            return a

        class Opaque:
            def __repr__(self) -> str:
                return "<Opaque>"

        @sdk.observe(name="odd", capture_input=True)
        def odd(o: Opaque, data: bytes, s: set[int]) -> Opaque:
            return o

        secret("hunter2")
        opt_in(7)
        odd(Opaque(), b"\x00\x01", {3})
        assert sdk.flush(10)
        s = c.by_name("secret")["attrs"]
        assert "input.value" not in s
        assert s["output.value"].startswith("x" * 100) and s["output.value"].endswith("[truncated 400 chars]")
        assert s["output.mime_type"] == "text/plain"
        o = c.by_name("opt-in")["attrs"]
        assert json.loads(o["input.value"]) == {"a": 7} and "output.value" not in o
        d = c.by_name("odd")["attrs"]
        assert json.loads(d["input.value"]) == {"o": "<Opaque>", "data": "<2 bytes>", "s": [3]}
    finally:
        sdk.shutdown(2)
        c.close()


def test_methods_drop_self_and_keep_their_binding(capture: Capture) -> None:
    class Bot:
        greeting = "hello"

        @sdk.observe(name="Bot.reply")
        def reply(self, who: str) -> str:
            return f"{self.greeting} {who}"

    assert Bot().reply("ann") == "hello ann"
    flushed(capture)
    assert json.loads(capture.by_name("Bot.reply")["attrs"]["input.value"]) == {"who": "ann"}


# -- never raise into the application -------------------------------------------------------------------


def test_bad_values_and_misuse_never_raise(capture: Capture) -> None:
    class Cyclic:
        pass

    loop: list[Any] = []
    loop.append(loop)
    errors_before = sdk.stats().errors

    @sdk.observe(kind="no-such-kind")  # falls back to CHAIN, with a warning
    def f(x: Any) -> Any:
        sdk.set_metadata({"obj": Cyclic(), 1: "int key"})
        sdk.set_tags(None, 5)  # type: ignore[arg-type]
        sdk.set_user(12345)  # type: ignore[arg-type]
        sdk.current_span().set_attribute("weird", {"a": Cyclic()})
        sdk.current_span().set_attribute("mixed", [1, "a"])
        return loop

    assert f(loop) is loop
    sdk.current_span().set_output("outside any span: a no-op")
    flushed(capture)
    a = capture.spans[0]["attrs"]
    assert a["openinference.span.kind"] == "CHAIN"
    assert a["user.id"] == "12345" and a["tag.tags"] == ["5"]
    assert json.loads(a["metadata"])["1"] == "int key"
    assert a["output.mime_type"] == "text/plain"  # a cycle is no JSON: its repr
    assert isinstance(a["weird"], str) and json.loads(a["mixed"]) == [1, "a"]
    assert sdk.stats().errors == errors_before


def test_without_init_everything_is_a_noop() -> None:
    sdk.shutdown(1)

    @sdk.observe
    def plain(x: int) -> int:
        sdk.set_user("u")
        return x + 1

    with sdk.span("nothing") as s:
        s.set_output("ignored")
        assert s.trace_id is None
    assert plain(1) == 2
    assert sdk.flush(0.1) is True


def test_down_server_app_runs_and_flush_returns() -> None:
    sdk.init(f"http://127.0.0.1:{free_port()}", "k", schedule_delay_s=0.05, export_timeout_s=600)
    try:

        @sdk.observe
        def work(i: int) -> int:
            return i * 2

        assert [work(i) for i in range(20)] == [i * 2 for i in range(20)]
        # the export retries until its own (long) timeout; flush still returns at its deadline
        assert sdk.flush(1.0) is False
    finally:
        assert sdk.shutdown(0.5) is False
    # shutdown cancels the export in flight and abandons the rest, counting them
    st = until(lambda: sdk.stats(), lambda st: st.failed == 20)
    assert st.exported == 0 and st.dropped == 0 and st.queued == 0


def test_flush_returns_at_its_deadline_while_the_server_hangs() -> None:
    c = Capture()
    c.hold.set()  # every request blocks until released
    sdk.init(c.url, "k", schedule_delay_s=0.05, export_timeout_s=600)
    try:
        with sdk.span("slow-export"):
            pass
        # without the deadline this would wait for the 600 s export timeout (and the test time out)
        assert sdk.flush(0.5) is False
        c.released.set()
        assert sdk.flush(30) is True
        assert c.by_name("slow-export")
    finally:
        sdk.shutdown(2)
        c.close()


def test_full_queue_drops_and_counts_without_blocking() -> None:
    c = Capture()
    c.hold.set()
    # the worker takes one batch of 5 and hangs on it; the queue holds 10 more; the rest are dropped
    sdk.init(c.url, "k", max_queue_size=10, max_batch_size=5, schedule_delay_s=60, export_timeout_s=600)
    try:

        @sdk.observe
        def step(i: int) -> int:
            return i

        total = 200
        assert sum(step(i) for i in range(total)) == sum(range(total))  # never waited on the queue
        st = sdk.stats()
        assert st.dropped >= total - 15 and st.queued <= 10
        c.released.set()
        assert sdk.flush(30) is True
        st = sdk.stats()
        assert st.dropped + st.exported == total and st.failed == 0
        assert len(c.spans) == st.exported
    finally:
        sdk.shutdown(2)
        c.close()


def test_retryable_refusals_are_retried_with_retry_after() -> None:
    c = Capture()
    c.refuse = 2
    sdk.init(c.url, "k", schedule_delay_s=0.05)
    try:
        with sdk.span("eventually"):
            pass
        assert sdk.flush(30) is True
        assert c.by_name("eventually") and len(c.requests) == 3
        assert sdk.stats().exported == 1
    finally:
        sdk.shutdown(2)
        c.close()


def test_spans_left_at_exit_are_exported_and_forked_children_export_their_own(tmp_path: Path) -> None:
    c = Capture()
    script = f"""
import os
import keel.sdk as keel

keel.init({c.url!r}, "k", schedule_delay_s=60)  # no timed export: only the exit hook sends

with keel.span("parent-process"):
    pass
pid = os.fork()
if pid == 0:
    with keel.span("child-process"):
        pass
    keel.flush(10)
    os._exit(0)
os.waitpid(pid, 0)
"""
    try:
        r = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert c.by_name("parent-process") and c.by_name("child-process")
    finally:
        c.close()


def test_partial_success_rejections_count_as_failed() -> None:
    c = Capture()
    c.reject = 1
    sdk.init(c.url, "k", schedule_delay_s=60)
    try:
        with sdk.span("a"):
            pass
        with sdk.span("b"):
            pass
        assert sdk.flush(10) is False  # one of the two was not stored
        st = sdk.stats()
        assert (st.exported, st.failed) == (1, 1)
    finally:
        sdk.shutdown(2)
        c.close()


def test_global_provider_option_and_foreign_parents(tmp_path: Path) -> None:
    c = Capture()
    script = f"""
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
import keel.sdk as keel

app_tracer = TracerProvider().get_tracer("the-app")  # the app's own OpenTelemetry set-up, not exported
keel.init({c.url!r}, "k", set_global_provider=True)

@keel.observe(name="inside-foreign")
def work():
    return 1

with app_tracer.start_as_current_span("foreign") as foreign:
    work()
    print(format(foreign.get_span_context().span_id, "016x"))
with trace.get_tracer("other-lib").start_as_current_span("via-global"):
    pass
keel.flush(10)
"""
    try:
        r = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert c.by_name("inside-foreign")["parent"] == r.stdout.strip()
        assert c.by_name("via-global")["scope"] == "other-lib"
        assert not [s for s in c.spans if s["name"] == "foreign"]
    finally:
        c.close()


def test_env_configures_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    c = Capture()
    monkeypatch.setenv("KEEL_BASE_URL", c.url + "/v1/")
    monkeypatch.setenv("KEEL_API_KEY", "sk-from-env")
    cfg = sdk.init(schedule_delay_s=0.05)
    try:
        assert cfg is not None and cfg.base_url == c.url and cfg.api_key == "sk-from-env"
        with sdk.span("from-env"):
            pass
        assert sdk.flush(10)
        assert c.requests[0]["headers"]["authorization"] == "Bearer sk-from-env"
    finally:
        sdk.shutdown(2)
        c.close()


def test_gateway_headers_carry_the_current_span_and_context(capture: Capture) -> None:
    assert "traceparent" not in sdk.gateway_headers()
    with sdk.span("outer") as s:
        sdk.set_session("sess-9")
        sdk.set_tags("a,b", "c")
        sdk.set_metadata(step="x")
        h = sdk.gateway_headers()
    assert re.fullmatch(f"00-{s.trace_id}-{s.span_id}-0[13]", h["traceparent"])  # sampled (+ random id)
    assert h["x-keel-session-id"] == "sess-9"
    assert h["x-keel-tags"] == "a b,c"
    assert json.loads(h["x-keel-metadata"]) == {"step": "x"}


# -- end to end: a real keel, the gateway through the wrapper ----------------------------------------


@pytest.fixture
def traced(keel: Keel) -> Iterator[Keel]:
    sdk.init(keel.url, keel.master_key, service_name="shop-app", schedule_delay_s=0.05)
    try:
        yield keel
    finally:
        sdk.shutdown(5)


def stored(keel: Keel, trace_id: str, n_spans: int) -> dict[str, Any]:
    """The trace once it holds ``n_spans`` spans (app and gateway spans arrive separately)."""
    return dict(
        until(
            lambda: keel.http.get(f"/api/traces/{trace_id}"),
            lambda r: r.status_code == 200 and len(r.json()["spans"]) >= n_spans,
        ).json()
    )


def test_an_observed_app_and_its_gateway_calls_form_one_trace(traced: Keel) -> None:
    keel = traced
    client = sdk.openai_client(max_retries=0)
    seen: dict[str, Any] = {}

    @sdk.observe(name="find-docs", kind="retriever")
    def find_docs(question: str) -> list[str]:
        return ["keel traces every call"]

    @sdk.observe(name="answer", kind="agent")
    def answer(question: str) -> str:
        sdk.set_user("ada")
        sdk.set_session(f"sess-e2e-{keel.backend}")
        sdk.set_tags("sdk-e2e")
        docs = find_docs(question)
        reply = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": docs[0]}, {"role": "user", "content": question}],
        )
        seen["trace_id"], seen["span_id"] = sdk.current_span().trace_id, sdk.current_span().span_id
        return str(reply.choices[0].message.content)

    assert answer("what is keel?") == "Mock reply to: what is keel?"
    assert sdk.flush(10) is True
    t = stored(keel, seen["trace_id"], 3)
    spans = {s["name"]: s for s in t["spans"]}
    root, docs = spans["answer"], spans["find-docs"]
    (llm,) = [s for s in t["spans"] if s["kind"] == "llm"]
    # one tree: the gateway's LLM span under the @observe span that made the call
    assert root["parent_span_id"] is None and root["span_id"] == seen["span_id"]
    assert docs["parent_span_id"] == root["span_id"] and llm["parent_span_id"] == root["span_id"]
    # kinds, I/O, tokens and cost
    assert (root["kind"], docs["kind"]) == ("agent", "retriever")
    assert root["input"] == {"question": "what is keel?"} and root["output"] == "Mock reply to: what is keel?"
    assert docs["output"] == ["keel traces every call"]
    assert llm["model"] == "gpt-4o-mini" and llm["input_tokens"] > 0 and llm["output_tokens"] > 0
    assert llm["cost_usd"] > 0
    # user/session/tags: on the app's spans, and the session and tags reached the gateway too
    assert root["user"] == docs["user"] == "ada"
    assert llm["attributes"].get("session.id") == f"sess-e2e-{keel.backend}"
    assert "sdk-e2e" in llm["attributes"].get("keel.tags", [])
    assert t["name"] == "answer" and t["user"] == "ada"


async def test_async_client_streams_nest_under_the_observed_coroutine(traced: Keel) -> None:
    keel = traced
    client = sdk.async_openai_client(max_retries=0)
    seen: dict[str, Any] = {}

    @sdk.observe(name="stream-answer")
    async def stream_answer(q: str) -> str:
        seen["trace_id"], seen["span_id"] = sdk.current_span().trace_id, sdk.current_span().span_id
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": q}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        return "".join(parts)

    assert await stream_answer("stream please") == "Mock reply to: stream please"
    await client.close()
    assert sdk.flush(10) is True
    t = stored(keel, seen["trace_id"], 2)
    (llm,) = [s for s in t["spans"] if s["kind"] == "llm"]
    assert llm["parent_span_id"] == seen["span_id"] and llm["output_tokens"] > 0 and llm["cost_usd"] > 0
    root = next(s for s in t["spans"] if s["name"] == "stream-answer")
    assert root["output"] == "Mock reply to: stream please"


def test_wrap_openai_propagates_on_an_existing_client(traced: Keel) -> None:
    import openai

    keel = traced
    client = sdk.wrap_openai(openai.OpenAI(base_url=f"{keel.url}/v1", api_key=keel.master_key, max_retries=0))
    with sdk.span("wrapped", kind="chain") as s:
        r = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert r.headers["x-keel-trace-id"] == s.trace_id  # the gateway joined the app's trace
    assert sdk.flush(10) is True
    t = stored(keel, str(s.trace_id), 2)
    (llm,) = [x for x in t["spans"] if x["kind"] == "llm"]
    assert llm["parent_span_id"] == s.span_id


def test_gateway_errors_inside_an_observed_function_are_recorded(traced: Keel) -> None:
    import openai

    keel = traced
    client = sdk.openai_client(max_retries=0)
    seen: dict[str, Any] = {}

    @sdk.observe(name="will-fail")
    def will_fail() -> None:
        seen["trace_id"] = sdk.current_span().trace_id
        client.chat.completions.create(model="fault-500", messages=[{"role": "user", "content": "x"}])

    with pytest.raises(openai.InternalServerError):
        will_fail()
    assert sdk.flush(10) is True
    t = stored(keel, seen["trace_id"], 2)
    root = next(s for s in t["spans"] if s["name"] == "will-fail")
    gw = next(s for s in t["spans"] if s["name"] != "will-fail")
    assert root["status"] == "error" and "InternalServerError" in (root["error"] or "")
    assert gw["status"] == "error" and gw["parent_span_id"] == root["span_id"]
    assert t["status"] == "error"


def test_readme_sdk_example_runs(keel: Keel, tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "keel.sdk" in b)
    # the README calls the bundled local model; the test keel serves the mock upstream
    code = block.replace('model="local"', 'model="gpt-4o-mini"')
    env = {**os.environ, "KEEL_BASE_URL": keel.url, "KEEL_API_KEY": keel.master_key}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Mock reply to: What does keel do?"
    page = until(
        lambda: keel.http.get("/api/traces", params={"session": "readme-demo"}).json()["data"],
        lambda data: bool(data),
    )
    t = stored(keel, page[0]["trace_id"], 3)
    kinds = sorted(s["kind"] for s in t["spans"])
    assert kinds == ["agent", "llm", "retriever"]
    root = next(s for s in t["spans"] if s["parent_span_id"] is None)
    assert all(s["parent_span_id"] == root["span_id"] for s in t["spans"] if s is not root)
