"""The trace writer: bounded queue, counted drops, batching, drain; the store's span folding."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from keel.gateway.stats import GatewayStats
from keel.store import Store, TraceFilter
from keel.tracing import TraceWriter, new_span_id, new_trace_id, parse_traceparent
from keel.types import SpanRecord, Usage


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store.from_url(f"sqlite:///{tmp_path}/t.db")
    return Store.from_url(request.getfixturevalue("pg_database"))


def rec(trace_id: str | None = None, **kw: object) -> SpanRecord:
    now = time.time()
    base: dict[str, object] = {
        "trace_id": trace_id or new_trace_id(),
        "span_id": new_span_id(),
        "name": "chat.completions",
        "kind": "llm",
        "start_time": now - 0.05,
        "end_time": now,
        "requested_model": "gpt-4o-mini",
        "model": "gpt-4o-mini",
        "provider": "openai",
        "usage": Usage(input_tokens=1000, output_tokens=100),
    }
    base.update(kw)
    return SpanRecord(**base)  # type: ignore[arg-type]


def test_full_queue_drops_and_counts_never_blocks(store: Store) -> None:
    w = TraceWriter(store, max_queue=3, batch_size=10)
    results = [w.submit(rec()) for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert w.stats.dropped == 2 and w.depth == 3
    stats = GatewayStats()
    stats.counters["keel_trace_dropped"] = ("dropped", lambda: w.stats.dropped)
    reg = CollectorRegistry()
    reg.register(type("C", (), {"collect": lambda self: stats.collect()})())  # type: ignore[arg-type]
    assert "keel_trace_dropped_total 2.0" in generate_latest(reg).decode()


def test_writer_batches_and_drains_on_stop(store: Store) -> None:
    tag = "w-" + uuid.uuid4().hex[:6]

    async def main() -> TraceWriter:
        w = TraceWriter(store, batch_size=50, flush_interval_s=10.0)
        w.start()
        for _ in range(120):
            w.submit(rec(tags=[tag]))
        await w.stop()  # long flush interval: only the drain writes the tail
        return w

    w = asyncio.run(main())
    assert w.stats.written == 120 and w.stats.batches >= 3 and w.depth == 0
    rows, _ = store.list_traces(TraceFilter(tag=tag), limit=500)
    assert len(rows) == 120


def test_spans_fold_into_one_trace_and_rewrites_are_idempotent(store: Store) -> None:
    from keel.tracing import span_to_row

    tid = new_trace_id()
    root = rec(
        tid, name="agent.run", kind="chain", usage=Usage(), requested_model=None, model=None, provider=None
    )
    child1 = rec(tid, parent_span_id=root.span_id, user="bob", tags=["a"])
    child2 = rec(tid, parent_span_id=root.span_id, status="error", error="upstream_error: boom", tags=["b"])
    rows = [span_to_row(r) for r in (root, child1, child2)]
    assert store.write_spans(rows) == 3
    assert store.write_spans(rows) == 0  # a retried batch adds nothing
    t = store.get_trace(tid)
    assert t is not None
    assert t["span_count"] == 3 and t["name"] == "agent.run" and t["status"] == "error"
    assert t["input_tokens"] == 2000 and t["output_tokens"] == 200 and t["user"] == "bob"
    assert t["tags"] == ["a", "b"] and t["error"] == "upstream_error: boom"
    assert t["cost_usd"] == pytest.approx(2 * (1000 * 0.15 + 100 * 0.6) / 1e6)
    assert {s["span_id"] for s in t["spans"]} == {root.span_id, child1.span_id, child2.span_id}


def test_unpriced_spans_are_marked_not_zero(store: Store) -> None:
    from keel.tracing import span_to_row

    row = span_to_row(rec(model="mystery-model-zz", requested_model="mystery", provider="openai-compatible"))
    assert row["cost_usd"] is None and row["priced"] is False
    row = span_to_row(rec(model="x", price_override=(2.0, 4.0)))
    assert row["cost_usd"] == pytest.approx((1000 * 2 + 100 * 4) / 1e6) and row["priced"] is True


def test_retention_deletes_old_traces(store: Store) -> None:
    from keel.store import utcnow
    from keel.tracing import span_to_row

    old = rec(start_time=time.time() - 10 * 86400, end_time=time.time() - 10 * 86400 + 1)
    new = rec()
    store.write_spans([span_to_row(old), span_to_row(new)])
    from datetime import timedelta

    assert store.delete_traces_before(utcnow() - timedelta(days=5)) >= 1
    assert store.get_trace(old.trace_id) is None and store.get_trace(new.trace_id) is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ),
        (
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00",
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("garbage", None),
        (None, None),
    ],
)
def test_traceparent_parsing(value: str | None, expected: tuple[str, str] | None) -> None:
    assert parse_traceparent(value) == expected


def test_process_writer_writes_drains_and_survives_its_child_dying(store: Store) -> None:
    """Process mode: spans written by a child process; a killed child is restarted, nothing is lost."""
    url = str(store.engine.url.render_as_string(hide_password=False))
    tag = "p-" + uuid.uuid4().hex[:6]

    async def main() -> TraceWriter:
        w = TraceWriter(store, batch_size=50, flush_interval_s=0.05, process_url=url)
        w.start()
        for _ in range(60):
            w.submit(rec(tags=[tag]))
        await asyncio.sleep(1.0)
        assert w._process is not None
        w._process._proc.kill()  # the child dies between batches
        await asyncio.sleep(0.2)
        for _ in range(60):
            w.submit(rec(tags=[tag]))
        await w.stop()
        return w

    w = asyncio.run(main())
    assert w.stats.written == 120 and w.stats.failed == 0
    rows, _ = store.list_traces(TraceFilter(tag=tag), limit=500)
    assert len(rows) == 120
