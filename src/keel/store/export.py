"""Export a filtered set of traces as JSON Lines or CSV, batch by batch (constant memory).

Traces are read newest first through the store's keyset pagination, so an export of millions of
traces holds one batch at a time; the API streams the chunks and the CLI writes them to a file.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from keel.store.models import Score, Span
from keel.store.repo import Store, TraceFilter, _span_dict
from keel.store.scores import score_dict

__all__ = ["CSV_COLUMNS", "EXPORT_BATCH", "INCLUDES", "csv_chunks", "iter_trace_batches", "jsonl_chunks"]

EXPORT_BATCH = 500
INCLUDES = ("spans", "scores")
CSV_COLUMNS = (
    "trace_id",
    "project_id",
    "key_id",
    "name",
    "start_time",
    "end_time",
    "latency_ms",
    "status",
    "model",
    "provider",
    "user",
    "session_id",
    "tags",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "error",
    "span_count",
    "prompt_name",
    "prompt_version",
)
# a cell starting with one of these is a formula to a spreadsheet: prefix it with a quote
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def iter_trace_batches(
    store: Store,
    f: TraceFilter,
    *,
    batch: int = EXPORT_BATCH,
    limit: int | None = None,
    spans: bool = False,
    scores: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Pages of matching traces, newest first; with ``spans``/``scores`` each trace carries them."""
    cursor: str | None = None
    left = limit
    while left is None or left > 0:
        size = batch if left is None else min(batch, left)
        rows, cursor = store.list_traces(f, limit=size, cursor=cursor)
        if not rows:
            return
        if spans or scores:
            _attach(store, rows, spans=spans, scores=scores)
        yield rows
        if left is not None:
            left -= len(rows)
        if cursor is None:
            return


def _attach(store: Store, rows: list[dict[str, Any]], *, spans: bool, scores: bool) -> None:
    ids = [r["trace_id"] for r in rows]
    by_id = {r["trace_id"]: r for r in rows}
    with Session(store.engine) as s:
        if spans:
            for r in rows:
                r["spans"] = []
            stmt = select(Span).where(Span.trace_id.in_(ids)).order_by(Span.start_time, Span.id)
            for sp in s.scalars(stmt):
                by_id[sp.trace_id]["spans"].append(_span_dict(sp))
        if scores:
            for r in rows:
                r["scores"] = []
            stmt2 = select(Score).where(Score.trace_id.in_(ids)).order_by(Score.created_at, Score.id)
            for sc in s.scalars(stmt2):
                by_id[sc.trace_id]["scores"].append(score_dict(sc))


def jsonl_chunks(batches: Iterable[list[dict[str, Any]]]) -> Iterator[bytes]:
    """One JSON object per line, one chunk per batch."""
    for rows in batches:
        yield b"".join(orjson.dumps(r, option=orjson.OPT_NON_STR_KEYS) + b"\n" for r in rows)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, list | dict):
        return orjson.dumps(v).decode()
    if isinstance(v, str) and v.startswith(_FORMULA_START):
        return "'" + v
    return v


def csv_chunks(batches: Iterable[list[dict[str, Any]]]) -> Iterator[bytes]:
    """A header row, then one flat row per trace (tags as a JSON array), one chunk per batch."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    yield buf.getvalue().encode()
    for rows in batches:
        buf.seek(0)
        buf.truncate()
        w.writerows([_cell(r.get(c)) for c in CSV_COLUMNS] for r in rows)
        yield buf.getvalue().encode()
