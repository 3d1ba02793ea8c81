"""The trace writer: a bounded in-memory queue drained in batches by one background task.

A request never waits on an insert: :meth:`TraceWriter.submit` is a non-blocking put; when the
queue is full the record is dropped and counted (exported in /metrics).  On shutdown
:meth:`TraceWriter.stop` drains what is queued.  Cost is computed here, off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from keel.pricing import price
from keel.store import Store, from_epoch
from keel.tracing.process_writer import ChildFailed, WriterProcess
from keel.types import SpanRecord

__all__ = ["TraceWriter", "WriterStats"]

log = logging.getLogger("keel.tracing")


class WriterStats:
    __slots__ = ("batches", "dropped", "failed", "unpriced", "written")

    def __init__(self) -> None:
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.batches = 0
        self.unpriced = 0


def span_to_row(rec: SpanRecord, store_bodies: bool = True, redactor: Any = None) -> dict[str, Any]:
    """Turn a queued record into the store's row dict (pricing it if needed)."""
    cost = rec.cost_usd
    priced = True
    if rec.kind in ("llm", "embedding"):
        if cost is None:
            cost = price(rec.model or rec.requested_model, rec.provider, rec.usage, rec.price_override)
        priced = cost is not None
    attrs = dict(rec.attributes)
    if rec.usage.estimated:
        attrs["keel.usage.estimated"] = True
    if rec.usage.cached_input_tokens:
        attrs["keel.usage.cached_input_tokens"] = rec.usage.cached_input_tokens
    if rec.usage.reasoning_tokens:
        attrs["keel.usage.reasoning_tokens"] = rec.usage.reasoning_tokens
    if rec.deployment:
        attrs["keel.deployment"] = rec.deployment
    if rec.stream:
        attrs["keel.stream"] = True
    if rec.metadata:
        attrs["keel.metadata"] = rec.metadata
    if rec.session_id:
        attrs["session.id"] = rec.session_id
    if rec.tags:
        attrs["keel.tags"] = rec.tags
    return {
        "trace_id": rec.trace_id,
        "span_id": rec.span_id,
        "parent_span_id": rec.parent_span_id,
        "project_id": rec.project_id,
        "key_id": rec.key_id,
        "team_id": rec.team_id,
        "name": rec.name,
        "kind": rec.kind,
        "start_time": from_epoch(rec.start_time),
        "end_time": from_epoch(rec.end_time),
        "latency_ms": (rec.end_time - rec.start_time) * 1000.0,
        "ttft_ms": rec.ttft_ms,
        "status": rec.status,
        "status_code": rec.status_code,
        "error": rec.error,
        "model": rec.model,
        "requested_model": rec.requested_model,
        "provider": rec.provider,
        "input_tokens": rec.usage.input_tokens,
        "output_tokens": rec.usage.output_tokens,
        "cost_usd": cost,
        "priced": priced,
        "user": rec.user,
        "session_id": rec.session_id,
        "prompt_name": rec.prompt_name,
        "prompt_version": rec.prompt_version,
        "tags": rec.tags,
        "input": None if not store_bodies else redactor.redact(rec.input) if redactor else rec.input,
        "output": None if not store_bodies else redactor.redact(rec.output) if redactor else rec.output,
        "attributes": attrs,
    }


class TraceWriter:
    """Bounded queue + batching writer task. One per process."""

    def __init__(
        self,
        store: Store,
        *,
        max_queue: int = 100_000,
        batch_size: int = 1000,
        flush_interval_s: float = 0.25,
        store_bodies: bool = True,
        redact_pii: bool = False,
        on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
        process_url: str | None = None,
    ) -> None:
        self.store = store
        # with a database URL, batches are written by a child process (see process_writer.py)
        self._process: WriterProcess | None = (
            WriterProcess(process_url, store_bodies, redact_pii) if process_url else None
        )
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.store_bodies = store_bodies
        self._redactor: Any = None
        if redact_pii and not process_url:  # the writer process builds its own
            from keel.guardrails.redact import Redactor

            self._redactor = Redactor()
        self.stats = WriterStats()
        self._q: deque[SpanRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._on_batch = on_batch
        self._inflight = 0
        self._restart_lock = threading.Lock()

    @property
    def depth(self) -> int:
        return len(self._q) + self._inflight

    def submit(self, rec: SpanRecord) -> bool:
        """Queue a finished span without waiting. Returns False (and counts a drop) when full."""
        if len(self._q) >= self.max_queue:
            self.stats.dropped += 1
            return False
        self._q.append(rec)
        if len(self._q) >= self.batch_size:
            self._wake.set()
        return True

    def submit_all(self, recs: list[SpanRecord], reserve: int = 0) -> bool:
        """Queue all of ``recs`` or none of them (OTLP ingest: a refused export is retried whole).

        ``reserve`` slots stay free for :meth:`submit` (the gateway). A refusal is not a drop: the
        caller tells its client to retry, so nothing is counted here.
        """
        if len(self._q) + len(recs) > self.max_queue - reserve:
            return False
        self._q.extend(recs)
        if len(self._q) >= self.batch_size:
            self._wake.set()
        return True

    def start(self) -> None:
        if self._process is not None and not self._process.alive:
            self._process.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keel-trace-writer")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Drain the queue (up to ``drain_timeout`` seconds) and stop the task."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            if not self._task.done():
                self._task.cancel()
            self._task = None
        remaining = len(self._q)
        if remaining:
            log.error("trace writer stopped with %d records unwritten", remaining)
        if self._process is not None:
            await asyncio.to_thread(self._process.stop)

    async def flush(self) -> None:
        """Write everything queued so far (used by tests and shutdown)."""
        while self._q:
            await self._write_batch()

    async def _run(self) -> None:
        # with a writer process, a second batch may be in flight: it waits in the pipe while the child
        # commits the first, so the child never idles while this process prepares the next one
        pending: set[asyncio.Task[None]] = set()
        try:
            await self._loop(pending)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self, pending: set[asyncio.Task[None]]) -> None:
        while True:
            if not self._q:
                if self._stopping:
                    return
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                if not self._q:
                    continue
            elif len(self._q) < self.batch_size and not self._stopping:
                # let a batch fill up a little; bounded by the flush interval
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            if self._process is not None:
                task = asyncio.get_running_loop().create_task(self._guarded_batch())
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(0)  # let it take its records off the queue
                if len(pending) >= 2:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._guarded_batch()

    async def _guarded_batch(self) -> None:
        try:
            await self._write_batch()
        except Exception:  # the loop must survive a bad batch or a database hiccup
            log.exception("trace writer batch failed")
            await asyncio.sleep(0.5)

    async def _write_batch(self) -> None:
        n = min(len(self._q), self.batch_size)
        if n == 0:
            return
        recs = [self._q.popleft() for _ in range(n)]
        self._inflight += n
        try:
            for attempt in range(5):
                try:
                    # conversion and pricing happen in the worker thread too: the event loop only queues
                    rows = await asyncio.to_thread(self._convert_and_write, recs)
                    break
                except Exception:
                    if attempt == 4:
                        self.stats.failed += len(recs)
                        log.exception("dropping %d spans after repeated write failures", len(recs))
                        return
                    await asyncio.sleep(0.2 * (2**attempt))
            self.stats.written += len(rows)
            self.stats.batches += 1
            self.stats.unpriced += sum(
                1 for r in rows if r["kind"] in ("llm", "embedding") and not r["priced"]
            )
            if self._on_batch:
                self._on_batch(rows)
        finally:
            self._inflight -= n

    def _convert_and_write(self, recs: list[SpanRecord]) -> list[dict[str, Any]]:
        proc = self._process
        if proc is not None:
            try:
                return proc.write(recs)
            except ChildFailed as exc:
                with self._restart_lock:  # two batches in flight may both see the child go
                    if proc.alive:
                        raise  # a failed batch (or a child another batch just restarted): retried
                    log.error("trace writer process died (%s); restarting it", exc)
                    try:
                        proc.stop(timeout=1)
                        proc.start()
                    except ChildFailed:
                        log.error("trace writer process cannot run; writing in this process from now on")
                        self._process = None
                if self._process is not None:
                    return proc.write(recs)
        rows = [span_to_row(r, self.store_bodies, self._redactor) for r in recs]
        self.store.write_spans(rows)
        return rows

    def now(self) -> float:
        return time.time()
