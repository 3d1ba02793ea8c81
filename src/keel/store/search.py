"""Full-text search over what was said in a trace: the last user message and the reply of each span.

The trace writer adds one ``trace_text`` row per span with text (capped in size). SQLite indexes it
with an external-content FTS5 table; PostgreSQL with a GIN index on its tsvector. Both are
created by migration 0005. A query's words must all occur (any order, case-insensitive); a word
ending in ``*`` matches as a prefix.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    delete,
    exists,
    false,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql import literal_column
from sqlalchemy.sql.expression import Executable, TextClause

from keel.store.models import Base, Trace

__all__ = [
    "MAX_TEXT_CHARS",
    "TraceText",
    "index_spans",
    "last_user_text",
    "match_traces",
    "output_text",
    "parse_query",
]

MAX_TEXT_CHARS = 1000  # per side (input, output) of a span: search wants the gist, and writes stay cheap
MAX_TERMS = 8
MAX_PREFIX_WORDS = 64  # a prefix standing for more words than this is left to FTS5's own prefix search
FEW_MATCHES = 2000  # up to this many matching spans are read by id; beyond, traces are walked by time
_WORD = re.compile(r"[^\W_]+\*?")
# the tsvector configuration: no stemming, like SQLite's unicode61 tokenizer
_TS_CONFIG = "'simple'::regconfig"


class TraceText(Base):
    """Searchable text of one span (its trace's last user message and its output)."""

    __tablename__ = "trace_text"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    trace_id: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_trace_text_trace", "trace_id"),
        Index(
            "ix_trace_text_tsv",
            func.to_tsvector(literal_column(_TS_CONFIG), literal_column("body")),
            postgresql_using="gin",
        ).ddl_if(dialect="postgresql"),
    )


# -- what gets indexed --------------------------------------------------------------------------


def _parts_text(content: Any) -> str | None:
    """Text of a message's content: a string, or the text parts of a list (OpenAI and Anthropic)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts) or None
    return None


def last_user_text(body: Any) -> str | None:
    """The last user message of a chat request (OpenAI or Anthropic shape), or an embedding's input."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return _parts_text(m.get("content"))
        return None
    value = body.get("input", body.get("prompt"))
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        return _parts_text(value)
    return None


def output_text(body: Any) -> str | None:
    """The reply's text: a chat.completion, a streamed ``{"role", "content"}``, an Anthropic message."""
    if isinstance(body, str):
        return body or None
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if isinstance(choices, list):
        texts = []
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            msg = ch.get("message") if isinstance(ch.get("message"), dict) else ch.get("delta")
            got = _parts_text(msg.get("content")) if isinstance(msg, dict) else _parts_text(ch.get("text"))
            if got:
                texts.append(got)
        return "\n".join(texts) or None
    return _parts_text(body.get("content"))


def _span_text(sp: dict[str, Any]) -> str | None:
    """The start of the span's last user message and of its output: the index needs no more."""
    parts = [
        t[:MAX_TEXT_CHARS]
        for t in (last_user_text(sp.get("input")), output_text(sp.get("output")))
        if t and not t.isspace()
    ]
    return "\n".join(parts) if parts else None


def index_spans(conn: Connection, spans: list[dict[str, Any]]) -> None:
    """Add the searchable text of freshly written spans (inside the writer's transaction).

    SQLite: rows go into the FTS index by one executemany with explicit rowids (a trigger would
    flush FTS5's pending terms once per row, several times slower). The writer has already
    inserted spans in this transaction, so it holds SQLite's write lock and max(id) cannot move.
    """
    pairs = [(sp["trace_id"], body) for sp in spans if (body := _span_text(sp))]
    if not pairs:
        return
    if conn.dialect.name != "sqlite":
        conn.exec_driver_sql("INSERT INTO trace_text (trace_id, body) VALUES (%s, %s)", pairs)
        return
    top = conn.exec_driver_sql("SELECT coalesce(max(id), 0) FROM trace_text").scalar_one()
    rows = [(top + i, tid, body) for i, (tid, body) in enumerate(pairs, 1)]
    conn.exec_driver_sql("INSERT INTO trace_text (id, trace_id, body) VALUES (?, ?, ?)", rows)
    conn.exec_driver_sql("INSERT INTO trace_fts (rowid, body) VALUES (?, ?)", [(r[0], r[2]) for r in rows])


def delete_text(conn: Connection, trace_ids: list[str]) -> None:
    """Forget the text of deleted traces, on SQLite first from the FTS index (it needs the old text)."""
    if conn.dialect.name == "sqlite":
        conn.execute(
            text(
                "INSERT INTO trace_fts (trace_fts, rowid, body) "
                "SELECT 'delete', id, body FROM trace_text WHERE trace_id IN :ids"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": trace_ids},
        )
    conn.execute(delete(TraceText).where(TraceText.trace_id.in_(trace_ids)))


# -- queries ------------------------------------------------------------------------------------


def parse_query(q: str) -> list[str]:
    """The words of a search (``word`` or ``prefix*``), lower-cased; ValueError when there are none."""
    terms = [t.lower() for t in _WORD.findall(q)][:MAX_TERMS]
    if not terms:
        raise ValueError("the search has no words to look for")
    return terms


def _fts_query(conn: Connection, terms: list[str]) -> str | None:
    """The FTS5 query for ``terms``; None when a prefix matches no indexed word.

    A prefix becomes the words it stands for, read from the index's vocabulary: FTS5 would merge
    every such word's postings again at each row it checks, which is slow for a common prefix.
    """
    parts = []
    for t in terms:
        if not t.endswith("*"):
            parts.append(f'"{t}"')
            continue
        prefix = t[:-1]
        if prefix.isascii():
            conn.exec_driver_sql(
                "CREATE VIRTUAL TABLE IF NOT EXISTS temp.trace_fts_vocab USING fts5vocab(main, trace_fts, row)"
            )
            upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            words = (
                conn.exec_driver_sql(
                    "SELECT term FROM temp.trace_fts_vocab WHERE term >= ? AND term < ? LIMIT ?",
                    (prefix, upper, MAX_PREFIX_WORDS + 1),
                )
                .scalars()
                .all()
            )
            if not words:
                return None
            if len(words) <= MAX_PREFIX_WORDS:
                parts.append("(" + " OR ".join(f'"{w}"' for w in words) + ")")
                continue
        parts.append(f'"{prefix}"*')
    return " AND ".join(parts)


def match_traces(engine: Engine, q: str) -> ColumnElement[bool]:
    """A condition on ``traces``: the trace has a span whose text matches every word of ``q``.

    A probe reads up to FEW_MATCHES matching spans first. When that is all of them, the condition is
    their trace ids (the newest are then picked by a short sort). A search with more matches (a
    common word) walks the traces newest-first instead and checks each one against the index, which
    stops as soon as a page is full. Left to itself, each planner misjudges one of the two cases.
    """
    terms = parse_query(q)
    matched: ColumnElement[bool] | TextClause
    probe: Executable
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            fts = _fts_query(conn, terms)
            if fts is None:
                return false()
            probe = text(
                "SELECT trace_text.trace_id FROM trace_fts JOIN trace_text ON trace_text.id = trace_fts.rowid "
                "WHERE trace_fts MATCH :fts_q LIMIT :n"
            )
            matched = text(
                "EXISTS (SELECT 1 FROM trace_fts WHERE trace_fts MATCH :fts_q AND trace_fts.rowid = trace_text.id)"
            ).bindparams(fts_q=fts)
            params: dict[str, Any] = {"fts_q": fts}
        else:
            tsq = " & ".join(f"{t[:-1]}:*" if t.endswith("*") else t for t in terms)
            matched = func.to_tsvector(literal_column(_TS_CONFIG), TraceText.body).op("@@")(
                func.to_tsquery(literal_column(_TS_CONFIG), tsq)
            )
            probe = select(TraceText.trace_id).where(matched).limit(bindparam("n"))
            params = {}
        found = conn.execute(probe, {**params, "n": FEW_MATCHES + 1}).scalars().all()
    if len(found) <= FEW_MATCHES:  # every matching span was read (several may share a trace)
        return Trace.trace_id.in_(set(found)) if found else false()
    return exists(
        select(literal_column("1"))
        .select_from(TraceText)
        .where(TraceText.trace_id == Trace.trace_id, matched)
    )
