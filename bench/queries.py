"""keel query benchmark: trace list, filters and dashboards over 1M spans, on SQLite and PostgreSQL.

For each backend it creates a fresh database (a SQLite file in a temp dir; a new PostgreSQL
database next to ``--pg-url``'s, dropped afterwards unless ``--keep``), migrates it, and loads
``--spans`` spans (default 1,000,000; about 280k traces) through the store's own write path,
``Store.write_spans`` — the trace writer's path, so trace summaries, tags, the full-text index and
the metric rollups are all maintained as in production — in batches of whole traces, oldest first.
The data is spread over the last 7 days with a daily rhythm: 3 projects, 8 models, 5,000 users
(Zipf), about 30,000 sessions, 15 tags, 6 prompts with several versions, 3% errors; gateway calls
(1 span), agent runs (a root and 4-10 children) and RAG calls (4 spans); half the LLM calls
streamed (with a TTFT). Then up to 100k scores spread over the week (``insert_scores``: with their
rollups). Then ``ANALYZE``.

Then it times each query ``--runs`` times (default 30; the first run of each is an untimed
warm-up) and prints P50 and P95 per query and backend:

* trace list: the newest page, a deep page (a cursor in the middle of the week);
* filters: model, user (busy and rare), session, tag, status, a time range, model + status;
* dashboards: the summary over 24 h and 7 days (all projects and one project), broken down by
  model, user, session, tag and prompt version; time series over 24 h and 7 days, per model and
  per user; scores over 7 days.

Queries are timed at the store (``Store.list_traces``, ``keel.store.metrics.Metrics``), the
functions the API and UI routes call. The exit status is 1 when any P95 exceeds ``--target-ms``
(300), else 0.

Usage::

    .venv/bin/python bench/queries.py                        # 1M spans, SQLite and PostgreSQL
    .venv/bin/python bench/queries.py --spans 200000 --backends sqlite
    .venv/bin/python bench/queries.py --markdown             # also print the table for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import func, select, text

from keel.store import Store, TraceFilter, utcnow
from keel.store.metrics import Metrics
from keel.store.models import Trace
from keel.store.scores import insert_scores

console = Console()

MODELS = [  # (name, provider, weight, median latency ms, $ per 1k tokens in, out)
    ("gpt-4o-mini", "openai", 30, 700, 0.00015, 0.0006),
    ("gpt-4o", "openai", 15, 1400, 0.0025, 0.01),
    ("claude-haiku", "anthropic", 15, 800, 0.0008, 0.004),
    ("claude-sonnet", "anthropic", 10, 1800, 0.003, 0.015),
    ("gemini-flash", "google", 10, 600, 0.0001, 0.0004),
    ("llama-70b", "openai-compatible", 8, 1200, 0.0006, 0.0006),
    ("mistral-small", "openai-compatible", 7, 500, 0.0002, 0.0006),
    ("local", "local", 5, 300, None, None),
]
TAGS = [f"tag-{t}" for t in ("prod", "beta", "eval", "batch", "chat", "search", "agent", "rag", "mobile", "web",
                             "support", "sales", "internal", "canary", "vip")]  # fmt: skip
PROMPTS = [("greeting", 3), ("summarise", 5), ("classify", 2), ("extract", 4), ("plan", 3), ("answer", 6)]
PROJECTS = [("proj_bench_main", 70), ("proj_bench_team", 20), ("proj_bench_lab", 10)]
N_USERS = 5000
DAYS = 7


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (k**s) for k in range(1, n + 1)]


@dataclass
class Gen:
    """Deterministic generator of realistic traces (as span dicts for Store.write_spans)."""

    rng: random.Random
    end: datetime

    def __post_init__(self) -> None:
        self.user_w = _zipf_weights(N_USERS)
        self.users = [f"user-{k:05d}" for k in range(N_USERS)]
        self.sessions: dict[str, int] = {}
        self.model_w = [m[2] for m in MODELS]
        self.project_w = [p[1] for p in PROJECTS]

    def start_time(self) -> datetime:
        # a daily rhythm: twice as busy in the (UTC) afternoon as at night
        while True:
            t = self.rng.uniform(0, DAYS * 86400)
            at = self.end - timedelta(seconds=t)
            hour = at.hour + at.minute / 60
            if self.rng.random() < 0.5 + 0.5 * math.sin(math.pi * hour / 24):
                return at

    def trace(self) -> list[dict[str, Any]]:
        rng = self.rng
        tid = uuid.UUID(int=rng.getrandbits(128)).hex
        start = self.start_time()
        project = rng.choices(PROJECTS, self.project_w)[0][0]
        user = rng.choices(self.users, self.user_w)[0] if rng.random() < 0.9 else None
        session = None
        if user is not None and rng.random() < 0.8:
            n = self.sessions.get(user, 0)
            if n == 0 or rng.random() < 0.15:
                n = self.sessions[user] = n + 1
            session = f"{user}-s{rng.randint(1, n)}"
        tags = rng.sample(TAGS, rng.choices((0, 1, 2, 3), (30, 40, 20, 10))[0]) or None
        prompt = rng.choice(PROMPTS) if rng.random() < 0.4 else None
        prompt_name = prompt[0] if prompt else None
        prompt_version = rng.randint(1, prompt[1]) if prompt else None
        model = rng.choices(MODELS, self.model_w)[0]
        error = rng.random() < 0.03
        common = {
            "trace_id": tid,
            "project_id": project,
            "key_id": f"key_bench_{project[-4:]}",
            "user": user,
            "session_id": session,
            "tags": tags,
            "prompt_name": prompt_name,
            "prompt_version": prompt_version,
        }
        shape = rng.random()
        if shape < 0.55:  # a gateway call
            return [self.llm(common, start, model, error, parent=None)]
        root_id = f"{rng.getrandbits(64):016x}"
        spans: list[dict[str, Any]] = []
        t = start + timedelta(milliseconds=rng.uniform(1, 20))
        if shape < 0.85:  # an agent run
            kinds = ["llm"] + [
                rng.choice(("llm", "tool", "tool", "retrieval")) for _ in range(rng.randint(3, 9))
            ]
            name = "agent run"
        else:  # a RAG call
            kinds = ["embedding", "retrieval", "llm"]
            name = "rag answer"
        for k, kind in enumerate(kinds):
            failing = error and k == len(kinds) - 1
            if kind in ("llm", "embedding"):
                sp = self.llm(common, t, model, failing, parent=root_id, kind=kind)
            else:
                lat = rng.lognormvariate(math.log(80), 0.8)
                sp = self.span(common, t, lat, kind, f"{kind} step", root_id, failing)
            spans.append(sp)
            t = sp["end_time"] + timedelta(milliseconds=rng.uniform(0.5, 5))
        root_lat = (t - start).total_seconds() * 1000
        spans.insert(
            0,
            self.span(
                common, start, root_lat, "agent" if name == "agent run" else "chain", name, None, error
            ),
        )
        for sp in spans[1:]:
            sp["tags"] = None  # tags travel on the root
        return spans

    def span(
        self,
        common: dict[str, Any],
        start: datetime,
        lat: float,
        kind: str,
        name: str,
        parent: str | None,
        error: bool,
    ) -> dict[str, Any]:
        return {
            **common,
            "span_id": f"{self.rng.getrandbits(64):016x}",
            "parent_span_id": parent,
            "name": name,
            "kind": kind,
            "start_time": start,
            "end_time": start + timedelta(milliseconds=lat),
            "latency_ms": lat,
            "status": "error" if error else "ok",
            "status_code": 500 if error else None,
            "error": "upstream error 500" if error else None,
        }

    def llm(
        self, common: dict[str, Any], start: datetime, model: tuple[Any, ...], error: bool, parent: str | None,
        kind: str = "llm",
    ) -> dict[str, Any]:  # fmt: skip
        rng = self.rng
        name, provider, _, median, cin, cout = model
        lat = rng.lognormvariate(math.log(median), 0.6)
        sp = self.span(common, start, lat, kind, f"chat {name}", parent, error)
        inp = int(rng.lognormvariate(math.log(400), 0.9))
        out = 0 if kind == "embedding" or error else int(rng.lognormvariate(math.log(150), 0.8))
        stream = kind == "llm" and not error and rng.random() < 0.5
        sp.update(
            model=name,
            requested_model=name,
            provider=provider,
            input_tokens=inp,
            output_tokens=out,
            cost_usd=None if cin is None else (inp * cin + out * cout) / 1000,
            priced=cin is not None,
            ttft_ms=lat * rng.uniform(0.1, 0.4) if stream else None,
            input={
                "messages": [
                    {"role": "user", "content": f"question {rng.randint(1, 10**6)} about the product"}
                ]
            },
            output=None
            if error
            else {"choices": [{"message": {"role": "assistant", "content": "an answer " * 8}}]},
            attributes={"keel.stream": True} if stream else None,
        )
        return sp


def load(store: Store, n_spans: int, seed: int, label: str) -> dict[str, Any]:
    """Write ~n_spans spans through Store.write_spans, oldest traces first. Returns facts for the queries."""
    rng = random.Random(seed)
    gen = Gen(rng, utcnow())
    traces: list[list[dict[str, Any]]] = []
    total = 0
    with console.status(f"[{label}] generating {n_spans:,} spans"):
        while total < n_spans:
            tr = gen.trace()
            traces.append(tr)
            total += len(tr)
        traces.sort(key=lambda tr: tr[0]["start_time"])
    t0 = time.perf_counter()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("spans"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"[{label}] write_spans", total=total)
        batch: list[dict[str, Any]] = []
        for tr in traces:
            batch.extend(tr)
            if len(batch) >= 2000:
                store.write_spans(batch)
                progress.advance(task, len(batch))
                batch = []
        if batch:
            store.write_spans(batch)
            progress.advance(task, len(batch))
    elapsed = time.perf_counter() - t0
    # up to 100k scores on every n-th trace, created shortly after their trace
    scores = []
    for tr in traces[:: max(1, -(-len(traces) // 100_000))]:  # spread over the whole week
        root = tr[0]
        name, dtype = rng.choice([("helpfulness", "numeric"), ("thumbs", "boolean"), ("tone", "categorical")])
        value = (
            rng.uniform(0, 1)
            if dtype == "numeric"
            else float(rng.random() < 0.8)
            if dtype == "boolean"
            else None
        )
        scores.append(
            {
                "id": uuid.UUID(int=rng.getrandbits(128)).hex,
                "project_id": root["project_id"],
                "trace_id": root["trace_id"],
                "span_id": None,
                "name": name,
                "data_type": dtype,
                "value": value,
                "string_value": rng.choice(("polite", "neutral", "rude")) if dtype == "categorical" else None,
                "source": "api",
                "comment": None,
                "author": None,
                "created_at": root["end_time"] + timedelta(seconds=rng.uniform(1, 600)),
            }
        )
    insert_scores(store, scores)  # with their rollups, as add_score keeps them
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    console.print(
        f"[{label}] {total:,} spans in {len(traces):,} traces and {len(scores):,} scores written in "
        f"{elapsed:.0f} s ({total / elapsed:,.0f} spans/s through write_spans)"
    )
    return {"spans": total, "traces": len(traces), "scores": len(scores), "load_s": elapsed}


def facts_of(store: Store) -> dict[str, Any]:
    """What the filter queries look for, read back from the loaded database."""
    with store.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(Trace)).scalar_one()
        mid = conn.execute(
            select(Trace.start_time, Trace.trace_id)
            .order_by(Trace.start_time, Trace.trace_id)
            .offset(n // 2)
            .limit(1)
        ).one()
        busy_user = conn.execute(
            select(Trace.user_id)
            .where(Trace.user_id.is_not(None))
            .group_by(Trace.user_id)
            .order_by(func.count().desc())
            .limit(1)
        ).scalar_one()
        rare_user = conn.execute(
            select(Trace.user_id)
            .where(Trace.user_id.is_not(None))
            .group_by(Trace.user_id)
            .order_by(func.count(), Trace.user_id)
            .limit(1)
        ).scalar_one()
        session = conn.execute(
            select(Trace.session_id)
            .where(Trace.session_id.is_not(None))
            .order_by(Trace.start_time)
            .offset(n // 3)
            .limit(1)
        ).scalar_one()
    return {
        "traces": n,
        "mid": (mid[0], mid[1]),
        "busy_user": busy_user,
        "rare_user": rare_user,
        "session": session,
    }


def queries(store: Store, facts: dict[str, Any]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(group, name, call) for every timed query."""
    from keel.store.repo import _encode_cursor  # the cursor a client would hold at that page

    m = Metrics(store.engine)
    now = utcnow()
    day, week = now - timedelta(days=1), now - timedelta(days=7)
    deep = _encode_cursor(*facts["mid"])
    hour_start = now - timedelta(days=3, hours=5)

    def page(f: TraceFilter, cursor: str | None = None) -> Callable[[], Any]:
        return lambda: store.list_traces(f, limit=50, cursor=cursor)

    return [
        ("trace list", "newest page", page(TraceFilter())),
        ("trace list", "deep page (cursor mid-week)", page(TraceFilter(), deep)),
        ("trace list", "one project, newest page", page(TraceFilter(project_id="proj_bench_team"))),
        ("filter", "model", page(TraceFilter(model="claude-sonnet"))),
        ("filter", "user (busiest)", page(TraceFilter(user=facts["busy_user"]))),
        ("filter", "user (rare)", page(TraceFilter(user=facts["rare_user"]))),
        ("filter", "session", page(TraceFilter(session=facts["session"]))),
        ("filter", "tag", page(TraceFilter(tag="tag-canary"))),
        ("filter", "tag + model", page(TraceFilter(tag="tag-canary", model="gpt-4o"))),
        ("filter", "status=error", page(TraceFilter(status="error"))),
        ("filter", "time range (1 h, 3 days ago)", page(TraceFilter(start=hour_start, end=hour_start + timedelta(hours=1)))),
        ("filter", "model + status=error", page(TraceFilter(model="gpt-4o", status="error"))),
        ("dashboard", "summary 24 h", lambda: m.summary(start=day, end=now)),
        ("dashboard", "summary 7 d", lambda: m.summary(start=week, end=now)),
        ("dashboard", "summary 7 d, one project", lambda: m.summary(start=week, end=now, project_id="proj_bench_team")),
        ("dashboard", "summary 7 d by model", lambda: m.summary(start=week, end=now, group_by="model")),
        ("dashboard", "summary 7 d by prompt version", lambda: m.summary(start=week, end=now, group_by="prompt_version")),
        ("dashboard", "summary 7 d by tag", lambda: m.summary(start=week, end=now, group_by="tag")),
        ("dashboard", "summary 7 d by user", lambda: m.summary(start=week, end=now, group_by="user")),
        ("dashboard", "summary 7 d by session", lambda: m.summary(start=week, end=now, group_by="session")),
        ("dashboard", "summary 24 h by user", lambda: m.summary(start=day, end=now, group_by="user")),
        ("dashboard", "summary 24 h by session", lambda: m.summary(start=day, end=now, group_by="session")),
        ("dashboard", "timeseries 24 h (15 min)", lambda: m.timeseries(start=day, end=now)),
        ("dashboard", "timeseries 7 d (1 h)", lambda: m.timeseries(start=week, end=now, interval="1h")),
        ("dashboard", "timeseries 7 d (1 h) by model", lambda: m.timeseries(start=week, end=now, interval="1h", group_by="model")),
        ("dashboard", "timeseries 7 d (1 h) by tag", lambda: m.timeseries(start=week, end=now, interval="1h", group_by="tag")),
        ("dashboard", "timeseries 7 d (1 h) by user", lambda: m.timeseries(start=week, end=now, interval="1h", group_by="user")),
        ("dashboard", "timeseries 7 d (1 h) by session", lambda: m.timeseries(start=week, end=now, interval="1h", group_by="session")),
        ("dashboard", "timeseries 24 h (15 min) by user", lambda: m.timeseries(start=day, end=now, group_by="user")),
        ("dashboard", "scores 7 d", lambda: m.scores(start=week, end=now)),
        ("dashboard", "scores 7 d by model", lambda: m.scores(start=week, end=now, group_by="model")),
        ("dashboard", "scores 7 d by prompt version", lambda: m.scores(start=week, end=now, group_by="prompt_version")),
        ("dashboard", "scores 24 h (15 min)", lambda: m.scores(start=day, end=now)),
    ]  # fmt: skip


def measure(call: Callable[[], Any], runs: int) -> list[float]:
    call()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def p95(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


@dataclass
class Backend:
    name: str
    url: str
    cleanup: Callable[[], None]


def backends(args: argparse.Namespace, tmp: Path) -> Iterator[Backend]:
    for name in args.backends.split(","):
        if name == "sqlite":
            yield Backend("sqlite", f"sqlite:///{tmp}/bench.db", lambda: None)
        elif name == "postgresql":
            import psycopg

            db = "keel_bench_" + uuid.uuid4().hex[:8]
            with psycopg.connect(args.pg_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{db}"')

            def drop(db: str = db) -> None:
                if args.keep:
                    console.print(f"kept PostgreSQL database {db}")
                    return
                with psycopg.connect(args.pg_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

            yield Backend("postgresql", args.pg_url.rsplit("/", 1)[0] + "/" + db, drop)
        else:
            raise SystemExit(f"unknown backend {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--spans", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an existing database on the server to use",
    )
    p.add_argument("--target-ms", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--keep", action="store_true", help="keep the databases (SQLite file, PostgreSQL database)"
    )
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    p.add_argument("--sqlite-file", help="time the queries on this already loaded SQLite file (no load)")
    args = p.parse_args(argv)

    results: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
    loads: dict[str, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-queries-"))
    for be in backends(args, tmp):
        try:
            if be.name == "sqlite" and args.sqlite_file:
                store = Store.from_url(f"sqlite:///{args.sqlite_file}")
            else:
                store = Store.from_url(be.url)
                loads[be.name] = load(store, args.spans, args.seed, be.name)
            facts = facts_of(store)
            console.print(f"[{be.name}] {facts['traces']:,} traces; timing the queries")
            res = results[be.name] = {}
            with Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
            ) as progress:
                qs = queries(store, facts)
                task = progress.add_task(f"[{be.name}] queries x{args.runs}", total=len(qs))
                for group, name, call in qs:
                    times = measure(call, args.runs)
                    res[(group, name)] = (statistics.median(times), p95(times))
                    progress.advance(task)
            store.close()
        finally:
            be.cleanup()
    if args.keep:
        console.print(f"kept SQLite file {tmp}/bench.db")

    names = list(next(iter(results.values())).keys()) if results else []
    table = Table(title=f"P50 / P95 ms over {args.runs} runs (target: P95 < {args.target_ms:.0f} ms)")
    table.add_column("group")
    table.add_column("query")
    for b in results:
        table.add_column(f"{b} P50", justify="right")
        table.add_column(f"{b} P95", justify="right")
    failed = []
    for key in names:
        cells = []
        for b, res in results.items():
            med, hi = res[key]
            bad = hi > args.target_ms
            if bad:
                failed.append(f"{b}: {key[0]} / {key[1]} P95 {hi:.1f} ms")
            cells += [f"{med:.1f}", f"[red]{hi:.1f}[/red]" if bad else f"{hi:.1f}"]
        table.add_row(key[0], key[1], *cells)
    console.print(table)
    for b, f in loads.items():
        console.print(
            f"{b}: {f['spans']:,} spans, {f['traces']:,} traces; load {f['load_s']:.0f} s ({f['spans'] / f['load_s']:,.0f} spans/s)"
        )
    if args.markdown:
        head = "| group | query | " + " | ".join(f"{b} P50 | {b} P95" for b in results) + " |"
        print(head)
        print("|---|---|" + "---:|---:|" * len(results))
        for key in names:
            print(
                f"| {key[0]} | {key[1]} | "
                + " | ".join(f"{results[b][key][0]:.1f} | {results[b][key][1]:.1f}" for b in results)
                + " |"
            )
    if failed:
        console.print("[bold red]FAIL[/bold red]: " + "; ".join(failed))
        return 1
    console.print(f"[bold green]PASS[/bold green]: every P95 under {args.target_ms:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
