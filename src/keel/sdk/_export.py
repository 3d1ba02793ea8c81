"""Background export: a bounded span queue drained by one thread that posts OTLP/HTTP to keel.

Why not OpenTelemetry's ``BatchSpanProcessor``: when its queue is full it drops spans with a log
line and no counter, and its ``force_flush`` ignores its timeout (opentelemetry-python #4568).
Here a full queue drops the new span and counts it, and :meth:`ExportQueue.flush` waits no longer
than its deadline whatever the server does (the export itself runs on the worker thread).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from keel.sdk._otlp import encode_spans

__all__ = ["ExportQueue", "ExportStats", "HttpExporter", "warn_once"]

log = logging.getLogger("keel.sdk")

_RETRYABLE = frozenset({408, 429, 502, 503, 504})
_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log a warning the first time ``key`` is seen, at debug level afterwards (never raises)."""
    with _warned_lock:
        first = key not in _warned
        _warned.add(key)
    log.log(logging.WARNING if first else logging.DEBUG, message, *args)


@dataclass(frozen=True, slots=True)
class ExportStats:
    """Counters of the SDK's export pipeline, as returned by :func:`keel.sdk.stats`."""

    queued: int = 0  # waiting in the queue now
    exported: int = 0  # accepted by the server
    dropped: int = 0  # not queued because the queue was full
    failed: int = 0  # export attempted and given up (server down, rejected, deadline passed)
    errors: int = 0  # SDK errors swallowed so the application never sees them


class HttpExporter:
    """Posts encoded spans to ``<base_url>/v1/traces`` with retries bounded by a deadline."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"content-type": "application/x-protobuf", "user-agent": "keel-sdk"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.url = f"{base_url}/v1/traces"
        self.timeout_s = timeout_s
        self._make_client = lambda: httpx.Client(headers=headers, timeout=timeout_s, transport=transport)
        self._client = self._make_client()

    def reset(self) -> None:
        """A fresh connection pool (after a fork: the parent's sockets are not ours)."""
        self._client = self._make_client()

    def export(self, spans: Sequence[ReadableSpan], deadline: float, cancel: threading.Event) -> int:
        """Send ``spans``; return how many the server accepted (0 when it failed or time ran out)."""
        body = encode_spans(spans)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or cancel.is_set():
                warn_once("deadline", "keel sdk: gave up exporting %d spans to %s", len(spans), self.url)
                return 0
            retry_after: float | None = None
            try:
                r = self._client.post(self.url, content=body, timeout=min(self.timeout_s, remaining))
            except httpx.HTTPError as exc:
                warn_once("http:" + type(exc).__name__, "keel sdk: cannot export to %s: %r", self.url, exc)
            else:
                if r.is_success:
                    return len(spans) - self._rejected(r)
                if r.status_code not in _RETRYABLE:
                    warn_once(
                        f"status:{r.status_code}",
                        "keel sdk: %s refused %d spans: %s %s",
                        self.url,
                        len(spans),
                        r.status_code,
                        r.text[:200],
                    )
                    return 0
                retry_after = _retry_after(r.headers.get("retry-after"))
                warn_once(
                    f"status:{r.status_code}", "keel sdk: %s answered %s, retrying", self.url, r.status_code
                )
            delay = retry_after if retry_after is not None else min(0.25 * 2**attempt, 5.0)
            attempt += 1
            if time.monotonic() + delay >= deadline or cancel.wait(delay):
                warn_once("deadline", "keel sdk: gave up exporting %d spans to %s", len(spans), self.url)
                return 0

    @staticmethod
    def _rejected(r: httpx.Response) -> int:
        """Spans the server refused in an OTLP ``partial_success`` (0 when it accepted all)."""
        if not r.content or "protobuf" not in r.headers.get("content-type", ""):
            return 0
        try:
            reply = ExportTraceServiceResponse.FromString(r.content)
        except Exception:
            return 0
        n = int(reply.partial_success.rejected_spans)
        if n:
            warn_once(
                "partial", "keel sdk: server rejected %d spans: %s", n, reply.partial_success.error_message
            )
        return n

    def close(self) -> None:
        self._client.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(float(value), 30.0))
    except ValueError:
        return None


class ExportQueue(SpanProcessor):
    """A span processor: ``on_end`` never blocks; one daemon thread exports batches."""

    def __init__(
        self,
        exporter: HttpExporter,
        max_queue_size: int = 2048,
        max_batch_size: int = 512,
        schedule_delay_s: float = 1.0,
        export_timeout_s: float = 30.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_queue_size = max(1, max_queue_size)
        self.max_batch_size = max(1, max_batch_size)
        self.schedule_delay_s = schedule_delay_s
        self.export_timeout_s = export_timeout_s
        self._cv = threading.Condition()
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._enqueued = 0  # spans ever queued; flush waits until _settled reaches the count it saw
        self._settled = 0
        self._urgent = False
        self._stopping = False
        self._closed = False
        self._cancel = threading.Event()
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self.errors = 0
        self._pid = os.getpid()
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="keel-sdk-export", daemon=True)
        t.start()
        return t

    # -- SpanProcessor --------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        ctx = span.context
        if ctx is None or not ctx.trace_flags.sampled:
            return
        if self._pid != os.getpid():
            self._after_fork()
        with self._cv:
            if self._stopping:
                self.dropped += 1
                return
            if len(self._queue) >= self.max_queue_size:
                self.dropped += 1
                warn_once(
                    "queue-full",
                    "keel sdk: export queue full (%d spans), dropping spans",
                    self.max_queue_size,
                )
                return
            self._queue.append(span)
            self._enqueued += 1
            if len(self._queue) >= self.max_batch_size:
                self._cv.notify_all()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000.0)

    def shutdown(self) -> None:
        self.close(self.shutdown_timeout_s)

    # -- public ---------------------------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export everything queued so far, waiting at most ``timeout_s``.

        True when all of it reached the server in time; False when time ran out or an export
        failed (:meth:`stats` counts what was lost).
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cv:
            target = self._enqueued
            failed_before = self.failed
            if self._settled >= target or self._stopping:
                return self._settled >= target
            self._urgent = True
            self._cv.notify_all()
            while self._settled < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(remaining)
            return self.failed == failed_before

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush within ``timeout_s``, then stop the worker (abandoning what is left)."""
        with self._cv:
            if self._closed:
                return self._settled >= self._enqueued
            self._closed = True
        done = self.flush(timeout_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._cancel.set()
        self._thread.join(timeout=0.5 if done else 0.0)
        if not self._thread.is_alive():
            self.exporter.close()
        return done

    def stats(self) -> ExportStats:
        with self._cv:
            return ExportStats(
                queued=len(self._queue),
                exported=self.exported,
                dropped=self.dropped,
                failed=self.failed,
                errors=self.errors,
            )

    # -- worker ---------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[list[ReadableSpan], bool]:
        with self._cv:
            wake_at = time.monotonic() + self.schedule_delay_s
            while not (self._stopping or self._urgent) and len(self._queue) < self.max_batch_size:
                remaining = wake_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            n = min(len(self._queue), self.max_batch_size)
            batch = [self._queue.popleft() for _ in range(n)]
            if not self._queue:
                self._urgent = False
            return batch, self._stopping

    def _run(self) -> None:
        while True:
            try:
                batch, stopping = self._next_batch()
                if stopping and not batch:
                    return
                if stopping:  # closing after its deadline: what is left is abandoned, and counted
                    with self._cv:
                        self.failed += len(batch) + len(self._queue)
                        self._settled += len(batch) + len(self._queue)
                        self._queue.clear()
                        self._cv.notify_all()
                    return
                if batch:
                    self._export(batch)
            except Exception:  # the worker must outlive any bug: count it and carry on
                log.debug("keel sdk: export worker error", exc_info=True)
                with self._cv:
                    self.errors += 1

    def _export(self, batch: list[ReadableSpan]) -> None:
        ok = 0
        try:
            ok = self.exporter.export(batch, time.monotonic() + self.export_timeout_s, self._cancel)
        except Exception:
            log.debug("keel sdk: export error", exc_info=True)
            with self._cv:
                self.errors += 1
        finally:
            with self._cv:
                self.exported += ok
                self.failed += len(batch) - ok
                self._settled += len(batch)
                self._cv.notify_all()

    def _after_fork(self) -> None:
        """In a forked child the worker thread is gone: start afresh with an empty queue."""
        self._pid = os.getpid()
        self.exporter.reset()
        self._cv = threading.Condition()
        self._queue = collections.deque()
        self._enqueued = self._settled = 0
        self._urgent = self._stopping = self._closed = False
        self._cancel = threading.Event()
        self._thread = self._start()
