"""The trace writer's database work in a child process, off the serving process's GIL.

Converting, pricing and inserting a span costs tens of microseconds of Python; done in a thread of
the serving process it competes with the event loop for the GIL and shows up in tail latency. In
process mode the serving process only serialises each batch (orjson, a few µs a span) and hands it
to this child over a pipe; the child writes it and acknowledges, so the parent knows exactly what
is stored (drain on shutdown, retries, metrics). The child ignores SIGINT/SIGTERM: the parent
decides when it stops, after the drain; when the parent goes away the pipe closes and so does it.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import orjson

from keel.types import SpanRecord, Usage

__all__ = ["WriterProcess", "child_main", "decode_records", "encode_records"]

log = logging.getLogger("keel.tracing")


def encode_records(recs: list[SpanRecord]) -> bytes:
    return orjson.dumps(recs, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def decode_records(blob: bytes) -> list[SpanRecord]:
    # orjson writes a dataclass's fields in declaration order, so positional construction is exact
    # (and ~3x cheaper than keyword unpacking: this runs for every span the writer stores)
    out = []
    for d in orjson.loads(blob):
        d["usage"] = Usage(*d["usage"].values())
        if d["price_override"] is not None:
            d["price_override"] = tuple(d["price_override"])
        out.append(SpanRecord(*d.values()))
    return out


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """What the parent needs of a written row for its metrics."""
    return {
        "kind": row["kind"],
        "requested_model": row["requested_model"],
        "cost_usd": row["cost_usd"],
        "priced": row["priced"],
        "attributes": {"keel.deployment": (row.get("attributes") or {}).get("keel.deployment", "-")},
    }


def _large_page_cache(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def child_main(conn: Connection, url: str, store_bodies: bool, redact_pii: bool = False) -> None:
    """Entry point of the writer process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from keel.store import Store
    from keel.tracing.writer import span_to_row

    store = Store.from_url(url, run_migrations=False)
    redactor = None
    if redact_pii:
        from keel.guardrails.redact import Redactor

        redactor = Redactor()
    if store.dialect == "sqlite":
        from sqlalchemy import event

        # this connection writes every span: a 64 MiB page cache (default 2 MiB) keeps the indexes'
        # hot pages and a whole batch without spilling, ~10% less CPU a span on a large database
        event.listen(store.engine, "connect", _large_page_cache)
    # a batch allocates thousands of short-lived, acyclic objects: let refcounting free them and
    # collect cycles between batches instead of in the middle of them
    gc.collect()
    gc.freeze()
    gc.disable()
    batches = 0
    try:
        while True:
            batches += 1
            if batches % 50 == 0:
                gc.collect()
            try:
                blob = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if not blob:
                conn.send_bytes(b"{}")
                return
            try:
                rows = [span_to_row(r, store_bodies, redactor) for r in decode_records(blob)]
                store.write_spans(rows)
                reply: dict[str, Any] = {"ok": True, "rows": [_compact(r) for r in rows]}
            except Exception as exc:  # reported to the parent, which retries the batch
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.send_bytes(orjson.dumps(reply))
    finally:
        store.close()


class ChildFailed(Exception):
    """The writer process reported a failure or went away."""


class WriterProcess:
    """Parent side: start the child, send batches, read acknowledgements (blocking: call from a thread).

    Two threads may call :meth:`write` at once (the trace writer keeps up to two batches in flight):
    sends are serialised, and each caller reads its own acknowledgement in the order it sent, so the
    child always finds the next batch waiting when it commits one. The oldest sender is always the
    one reading, so the child can always deliver its reply and then read the next batch: no deadlock.
    """

    def __init__(self, url: str, store_bodies: bool, redact_pii: bool = False) -> None:
        self.url = url
        self.store_bodies = store_bodies
        self.redact_pii = redact_pii
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # sends (and start/stop)
        self._turn = threading.Condition()  # replies, in send order
        self._gen = 0  # bumped by start(): callers of an older child give up
        self._sent = 0
        self._received = 0

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=child_main,
            args=(child, self.url, self.store_bodies, self.redact_pii),
            name="keel-trace-writer",
            daemon=True,
        )
        proc.start()
        child.close()
        with self._lock, self._turn:
            self._proc, self._conn = proc, parent
            self._gen += 1
            self._sent = self._received = 0
            self._turn.notify_all()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def write(self, recs: list[SpanRecord]) -> list[dict[str, Any]]:
        """Send one batch and wait until the child has committed it; returns the compact rows."""
        blob = encode_records(recs)  # outside the locks: overlaps the child's commit of the other batch
        failure: BaseException | None = None
        with self._lock:
            conn, gen = self._conn, self._gen
            if conn is None:
                raise ChildFailed("writer process not started")
            ticket = (
                self._sent
            )  # under the send lock only: a reader blocked in recv must not stop the next send
            self._sent += 1
            try:
                conn.send_bytes(blob)
            except (EOFError, OSError) as exc:
                failure = exc
        with self._turn:
            while self._gen == gen and self._received != ticket:
                self._turn.wait()
            if self._gen != gen:
                raise ChildFailed("writer process was restarted")
            try:
                if failure is not None:
                    raise ChildFailed(f"writer process went away: {failure}")
                raw = conn.recv_bytes()
            except (EOFError, OSError) as exc:
                raise ChildFailed(f"writer process went away: {exc}") from None
            finally:
                self._received += 1
                self._turn.notify_all()
        reply = orjson.loads(raw)
        if not reply.get("ok"):
            raise ChildFailed(str(reply.get("error")))
        rows: list[dict[str, Any]] = reply["rows"]
        return rows

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send_bytes(b"")
                    if self._conn.poll(timeout):
                        self._conn.recv_bytes()
                except (EOFError, OSError):
                    pass
                self._conn.close()
                self._conn = None
            with self._turn:  # anyone still waiting for a reply of this child gives up
                self._gen += 1
                self._turn.notify_all()
            if self._proc is not None:
                self._proc.join(timeout)
                if self._proc.is_alive():
                    self._proc.kill()
                self._proc = None
