"""Trace explorer: every filter of GET /api/traces, full-text search (q), and the indexes that serve them.

Seeds traces with Store.write_spans (controlled names, keys, teams, latencies, costs, text) plus one
through the gateway with the openai SDK; runs on SQLite (FTS5) and PostgreSQL (GIN tsvector).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text

from keel.store import TraceFilter, search, utcnow
from keel.store.search import last_user_text, output_text, parse_query


def _span(run: str, i: int, project: str, **kw: Any) -> dict[str, Any]:
    when = utcnow() - timedelta(minutes=30) + timedelta(seconds=i)
    sp = {
        "trace_id": uuid.uuid4().hex,
        "span_id": uuid.uuid4().hex[:16],
        "parent_span_id": None,
        "project_id": project,
        "key_id": f"key_{run}_{i % 2}",
        "team_id": f"team_{run}_{i % 3}",
        "name": f"agent-{run}-{i % 2}",
        "kind": "llm",
        "start_time": when,
        "end_time": when + timedelta(milliseconds=10 * (i + 1)),
        "latency_ms": 10.0 * (i + 1),
        "status": "ok",
        "model": "gpt-4o-mini",
        "provider": "openai" if i % 2 else "anthropic",
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_usd": 0.001 * (i + 1),
        "user": f"user-{run}",
        "session_id": f"s-{run}-{i % 4}",
        "prompt_name": f"prompt-{run}" if i < 4 else None,
        "prompt_version": (i % 2) + 1 if i < 4 else None,
        "input": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"question number{i} {run}"}],
        },
        "output": {"choices": [{"message": {"role": "assistant", "content": f"answer number{i} {run}"}}]},
    }
    sp.update(kw)
    return sp


@pytest.fixture(scope="module")
def corpus(keel: Any) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    project = keel.store.ensure_project(f"search-{run}")
    spans = [_span(run, i, project) for i in range(8)]
    # Anthropic-shaped bodies, content parts, diacritics, and a span with no text at all
    spans[5]["input"] = {
        "model": "claude",
        "system": "never indexed",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Crème brûlée recipe {run}"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": f"with caramelised sugar {run}"}]},
        ],
    }
    spans[5]["output"] = {"content": [{"type": "text", "text": f"Torch the surface {run}"}]}
    spans[6]["input"], spans[6]["output"] = None, None
    spans[7]["output"] = {"role": "assistant", "content": f"streamed zebra reply {run}"}  # a streamed reply
    keel.store.write_spans(spans)
    return {"run": run, "project": project, "spans": spans}


def _ids(keel: Any, **params: Any) -> set[str]:
    r = keel.http.get("/api/traces", params={"limit": 500, **params})
    assert r.status_code == 200, r.text
    return {t["trace_id"] for t in r.json()["data"]}


def _expect(corpus: dict[str, Any], pred: Any) -> set[str]:
    return {sp["trace_id"] for sp in corpus["spans"] if pred(sp)}


def test_every_filter(keel: Any, corpus: dict[str, Any]) -> None:
    run, project = corpus["run"], corpus["project"]
    base = {"project": project}
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"name": f"agent-{run}-1"}, lambda s: s["name"] == f"agent-{run}-1"),
        ({"key": f"key_{run}_0"}, lambda s: s["key_id"] == f"key_{run}_0"),
        ({"team": f"team_{run}_2"}, lambda s: s["team_id"] == f"team_{run}_2"),
        ({"provider": "anthropic"}, lambda s: s["provider"] == "anthropic"),
        ({"session": f"s-{run}-3"}, lambda s: s["session_id"] == f"s-{run}-3"),
        ({"user": f"user-{run}"}, lambda s: True),
        ({"prompt": f"prompt-{run}"}, lambda s: s["prompt_name"] is not None),
        ({"prompt": f"prompt-{run}", "prompt_version": 2}, lambda s: s["prompt_version"] == 2),
        ({"min_latency_ms": 30, "max_latency_ms": 60}, lambda s: 30 <= s["latency_ms"] <= 60),
        ({"min_cost_usd": 0.0045}, lambda s: s["cost_usd"] >= 0.0045),
        ({"max_cost_usd": 0.0025}, lambda s: s["cost_usd"] <= 0.0025),
        ({"model": "gpt-4o-mini", "status": "ok"}, lambda s: True),
        (
            {"provider": "openai", "min_latency_ms": 40},
            lambda s: s["provider"] == "openai" and s["latency_ms"] >= 40,
        ),
    ]
    for params, pred in cases:
        assert _ids(keel, **base, **params) == _expect(corpus, pred), params
    # the summary row carries team and key (the team filter reads traces.team_id)
    t = keel.store.list_traces(TraceFilter(project_id=project, team_id=f"team_{run}_0"))[0][0]
    assert t["key_id"].startswith(f"key_{run}_")


@pytest.mark.parametrize("few", [2000, 0], ids=["few-matches-plan", "many-matches-plan"])
def test_full_text_search(
    keel: Any, corpus: dict[str, Any], few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "FEW_MATCHES", few)  # SQLite picks its plan by the match count
    run, project, spans = corpus["run"], corpus["project"], corpus["spans"]
    p = {"project": project}
    assert _ids(keel, q=f"number3 {run}", **p) == {spans[3]["trace_id"]}  # words anywhere, all required
    assert _ids(keel, q="answer number4", **p) == {spans[4]["trace_id"]}  # the output is indexed
    assert _ids(keel, q="QUESTION Number2", **p) == {spans[2]["trace_id"]}  # case-insensitive
    assert _ids(keel, q=f"number* {run}", **p) == _expect(corpus, lambda s: s["input"] and "number" in str(s))
    assert _ids(keel, q="caramelised", **p) == {spans[5]["trace_id"]}  # last user message, content parts
    assert _ids(keel, q="brûlée", **p) == set()  # an earlier user message is not indexed
    assert _ids(keel, q="surface torch", **p) == {spans[5]["trace_id"]}  # Anthropic output blocks
    assert _ids(keel, q="zebra", **p) == {spans[7]["trace_id"]}  # a streamed reply
    assert _ids(keel, q="never indexed", **p) == set()  # the system prompt is not indexed
    assert _ids(keel, q="number3 number4", **p) == set()
    assert _ids(keel, q=f"nosuchprefix* {run}", **p) == set()
    assert _ids(keel, q=f"numb* answ* {run}", **p) == _expect(
        corpus, lambda s: s["output"] and "answer" in str(s)
    )
    # search composes with the other filters and with the cursor
    assert _ids(keel, q=f"question {run}", provider="openai", **p) == _expect(
        corpus, lambda s: s["provider"] == "openai" and s["input"] and "question" in str(s["input"])
    )
    r = keel.http.get("/api/traces", params={"q": f"question {run}", "limit": 2, **p}).json()
    assert len(r["data"]) == 2 and r["next_cursor"]
    r2 = keel.http.get(
        "/api/traces", params={"q": f"question {run}", "limit": 2, "cursor": r["next_cursor"], **p}
    )
    assert not {t["trace_id"] for t in r["data"]} & {t["trace_id"] for t in r2.json()["data"]}


def test_search_through_the_gateway_and_project_isolation(keel: Any) -> None:
    run = uuid.uuid4().hex[:8]
    mine = keel.create_key(project=f"search-gw-{run}", name="a")["key"]
    theirs = keel.create_key(project=f"search-gw-other-{run}", name="b")["key"]
    for key in (mine, theirs):
        raw = openai.OpenAI(
            base_url=keel.url + "/v1", api_key=key, max_retries=0
        ).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"marmalade {run}"}], stream=True
        )
        "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
        keel.wait_for_trace(raw.headers["x-keel-trace-id"])
    assert len(_ids(keel, q=f"marmalade {run}")) == 2  # master: both projects
    with httpx.Client(base_url=keel.url, headers={"authorization": f"Bearer {mine}"}) as c:
        rows = c.get("/api/traces", params={"q": f"marmalade {run}"}).json()["data"]
        assert len(rows) == 1 and rows[0]["project_id"] == c.get("/api/projects").json()[0]["id"]
        # a streamed reply's text is searchable too ("Mock reply to: ...")
        assert len(c.get("/api/traces", params={"q": f"mock reply marmalade {run}"}).json()["data"]) == 1


def test_bad_filters_are_400(keel: Any) -> None:
    for params in (
        {"q": "!!! ???"},
        {"q": "x" * 501},
        {"min_latency_ms": -1},
        {"max_cost_usd": "cheap"},
        {"prompt_version": 0},
        {"cursor": "garbage"},
    ):
        r = keel.http.get("/api/traces", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_retention_removes_the_text_too(keel: Any) -> None:
    run = uuid.uuid4().hex[:8]
    project = keel.store.ensure_project(f"search-ret-{run}")
    old = _span(run, 0, project, start_time=utcnow() - timedelta(days=4000))
    old["end_time"] = old["start_time"] + timedelta(milliseconds=5)
    old["input"] = {"messages": [{"role": "user", "content": f"ancient walrus {run}"}]}
    keel.store.write_spans([old])
    assert _ids(keel, q=f"walrus {run}") == {old["trace_id"]}
    keel.store.delete_traces_before(utcnow() - timedelta(days=3000))
    assert _ids(keel, q=f"walrus {run}") == set()
    with keel.store.engine.connect() as conn:
        assert (
            conn.scalar(text("SELECT count(*) FROM trace_text WHERE trace_id = :t"), {"t": old["trace_id"]})
            == 0
        )
        if keel.backend == "sqlite":  # the external-content FTS index agrees with its table
            conn.execute(text("INSERT INTO trace_fts(trace_fts, rank) VALUES ('integrity-check', 1)"))


def _plan(keel: Any, f: TraceFilter) -> str:
    """The database's plan for list_traces(f): the same statement the API runs."""
    captured: list[tuple[str, Any]] = []
    from sqlalchemy import event

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "FROM traces" in statement and "ORDER BY" in statement:
            captured.append((statement, params))

    event.listen(keel.store.engine, "before_cursor_execute", grab)
    try:
        keel.store.list_traces(f, limit=50)
    finally:
        event.remove(keel.store.engine, "before_cursor_execute", grab)
    statement, params = captured[-1]
    with keel.store.engine.connect() as conn:
        if keel.backend == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
            return "\n".join(str(r[-1]) for r in rows)
        # tiny tables make a sequential scan cheapest: forbid it to see which index serves the filter
        conn.exec_driver_sql("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params).all())
        conn.rollback()
        return plan


@pytest.mark.parametrize(
    "field,value,index",
    [
        ("session", "s", "ix_traces_session_start"),
        ("name", "n", "ix_traces_name_start"),
        ("key_id", "k", "ix_traces_key_start"),
        ("team_id", "t", "ix_traces_team_start"),
        ("provider", "p", "ix_traces_provider_start"),
        ("prompt_name", "p", "ix_traces_prompt_start"),
        ("user", "u", "ix_traces_user_cover"),
        ("model", "m", "ix_traces_model_start"),
        ("status", "error", "ix_traces_status_start"),
        # a range keeps newest-first order by walking the time index, or reads its own range index
        ("min_latency_ms", 1e9, ("ix_traces_latency", "ix_traces_start")),
        ("min_cost_usd", 1e9, ("ix_traces_cost", "ix_traces_start")),
        ("tag", "x", "ix_trace_tags_tag"),
    ],
)
def test_each_filter_is_served_by_an_index(
    keel: Any, corpus: dict[str, Any], field: str, value: Any, index: str | tuple[str, ...]
) -> None:
    plan = _plan(keel, TraceFilter(**{field: value}))
    assert any(ix in plan for ix in ((index,) if isinstance(index, str) else index)), plan
    if keel.backend == "sqlite":
        assert not any(line.strip() == "SCAN traces" for line in plan.splitlines()), plan  # no full scan
    else:
        assert "Seq Scan on traces" not in plan, plan


@pytest.mark.parametrize("few", [2000, 0], ids=["few-matches-plan", "many-matches-plan"])
def test_search_plans_use_the_text_index(
    keel: Any, corpus: dict[str, Any], few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "FEW_MATCHES", few)
    statements: list[str] = []
    from sqlalchemy import event

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        statements.append(statement)

    event.listen(keel.store.engine, "before_cursor_execute", grab)
    try:
        rows, _ = keel.store.list_traces(
            TraceFilter(project_id=corpus["project"], q=f"question {corpus['run']}")
        )
    finally:
        event.remove(keel.store.engine, "before_cursor_execute", grab)
    assert len(rows) == 6  # spans 5 (other words) and 6 (no text) do not match
    # the probe reads matches through the text index
    assert any("trace_fts MATCH" in st or "@@ to_tsquery" in st for st in statements if "LIMIT" in st)
    plan = _plan(keel, TraceFilter(q=f"question {corpus['run']}"))
    if few:  # the matching trace ids, looked up by primary key
        assert "sqlite_autoindex_traces_1" in plan or "traces_pkey" in plan, plan
    elif keel.backend == "sqlite":  # newest-first walk, each trace checked against the FTS index
        assert "ix_trace_text_trace" in plan and "trace_fts VIRTUAL TABLE" in plan, plan
    else:
        assert "ix_trace_text_trace" in plan or "ix_trace_text_tsv" in plan, plan


def test_text_extraction_and_query_parsing() -> None:
    assert (
        last_user_text({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
        == "b"
    )
    assert last_user_text({"input": ["one", "two"]}) == "one\ntwo"  # embeddings
    assert last_user_text("plain") == "plain" and last_user_text(42) is None
    assert output_text({"choices": [{"message": {"content": "x"}}, {"message": {"content": "y"}}]}) == "x\ny"
    assert output_text({"count": 1, "dimensions": 3}) is None  # an embedding's output has no text
    assert parse_query("Hello, wor* it's_me") == ["hello", "wor*", "it", "s", "me"]
    with pytest.raises(ValueError):
        parse_query("*** ---")


def test_migration_0005_matches_the_models(keel: Any) -> None:
    """Traces and trace_text as migrated equal the models (the FTS5 table is migration-only, SQLite)."""
    import warnings

    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from keel.store.models import Base

    with keel.store.engine.connect() as conn, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLite cannot reflect the PostgreSQL-only expression index
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    mine = [d for d in diff if "trace_text" in str(d) or "'traces'" in str(d) or "ix_traces_" in str(d)]
    assert mine == []
    hand_made = {d[1].name for d in diff if d[0] == "remove_table" and d[1].name.startswith("trace_")}
    fts = {"trace_fts", "trace_fts_config", "trace_fts_data", "trace_fts_docsize", "trace_fts_idx"}
    assert hand_made == (fts if keel.backend == "sqlite" else set())


@pytest.mark.parametrize("few", [3, 2000])
def test_search_counts_spans_not_traces_when_picking_a_plan(
    keel: Any, few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several matching spans in one trace must not make a partial probe look complete."""
    monkeypatch.setattr(search, "FEW_MATCHES", few)
    run = uuid.uuid4().hex[:8]
    project = keel.store.ensure_project(f"search-spans-{run}")
    busy = _span(run, 9, project)  # newest: three matching spans in one trace
    spans = [busy] + [
        {**busy, "span_id": uuid.uuid4().hex[:16], "parent_span_id": busy["span_id"]} for _ in range(2)
    ]
    spans += [_span(run, i, project) for i in range(2)]
    for sp in spans:
        sp["input"] = {"messages": [{"role": "user", "content": f"kiwi {run}"}]}
    keel.store.write_spans(spans)
    assert _ids(keel, q=f"kiwi {run}") == {sp["trace_id"] for sp in spans}
