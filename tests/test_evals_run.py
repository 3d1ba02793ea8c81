"""Eval runs end to end through a real keel (both backends) in front of the mock upstream.

Generations go through the gateway over HTTP: every call leaves a trace with its cost, the run is
stored through the REST API, a rerun is served from the output cache, the number of calls in
flight at the upstream never exceeds the configured concurrency, repeats and retries work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keel.config import ModelConfig
from keel.evals import EvalClient, execute_suite, parse_suite
from keel.testing import MockProvider, create_mock_app
from tests import conftest
from tests.conftest import BACKENDS, Keel, ServerThread, make_keel


class CountingUpstream:
    """The mock upstream's ASGI app, counting the HTTP requests in flight (and the peak)."""

    def __init__(self) -> None:
        self.app = create_mock_app()
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.total = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/chat"):
            await self.app(scope, receive, send)
            return
        with self.lock:
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)
        try:
            await self.app(scope, receive, send)
        finally:
            with self.lock:
                self.now -= 1

    def reset(self) -> None:
        with self.lock:
            self.peak = self.total = 0


@pytest.fixture(scope="module")
def counting() -> Iterator[tuple[CountingUpstream, ServerThread]]:
    up = CountingUpstream()
    server = ServerThread(up).start()
    try:
        yield up, server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def ek(
    request: pytest.FixtureRequest,
    mock_upstream: MockProvider,
    counting: tuple[CountingUpstream, ServerThread],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Keel]:
    """keel with the usual test models plus `counted` (slow, served by the counting upstream)."""
    _, up_server = counting
    models = (
        *conftest.test_models(mock_upstream),
        ModelConfig(
            name="counted",
            provider="openai-compatible",
            model="fault:slow:0.15",
            api_base=f"{up_server.url}/v1",
            input_cost_per_mtok=1.0,
            output_cost_per_mtok=2.0,
        ),
    )
    server, app = make_keel(
        request.param,
        tmp_path_factory.mktemp(f"evals-{request.param}"),
        mock_upstream,
        request,
        models=models,
    )
    k = Keel(server, app, request.param)
    try:
        yield k
    finally:
        k.http.close()
        server.stop()


def _items(n: int, prefix: str = "q") -> list[dict[str, Any]]:
    return [
        {
            "id": f"{prefix}{i}",
            "input": {"q": f"{prefix} number {i}"},
            "expected": f"Mock reply to: {prefix} number {i}",
        }
        for i in range(n)
    ]


def _suite(dataset: str, **over: Any) -> Any:
    doc: dict[str, Any] = {
        "name": "run-test",
        "dataset": dataset,
        "prompts": [{"name": "plain", "messages": [{"role": "user", "content": "{{ q }}"}]}],
        "models": ["gpt-4o-mini"],
        "scorers": ["exact", {"type": "contains", "value": "Mock"}, "levenshtein"],
        "concurrency": 4,
        "retries": 2,
        "retry_backoff_s": 0.01,
    }
    doc.update(over)
    return parse_suite(doc)


def _push(k: Keel, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    r = k.http.post("/api/datasets", json={"name": name, "items": items})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _execute(k: Keel, suite: Any, **kw: Any) -> Any:
    async def go() -> Any:
        async with EvalClient(k.url, k.master_key) as client:
            return await execute_suite(suite, client, **kw)

    return asyncio.run(go())


def test_a_run_is_traced_costed_and_stored(ek: Keel, tmp_path: Path) -> None:
    _push(ek, "traced", _items(6))
    report = _execute(ek, _suite("traced"), cache_dir=tmp_path)
    run = report.run
    assert run["status"] == "completed" and run["result_count"] == 6
    assert run["dataset"] == "traced" and run["dataset_version"] == 1
    scores = run["summary"]["variants"]["plain/gpt-4o-mini"]["scores"]
    assert scores["exact"]["mean"] == 1.0 and scores["exact"]["pass_rate"] == 1.0
    assert scores["contains"]["mean"] == 1.0 and scores["levenshtein"]["mean"] == 1.0
    # every generation left a trace with its cost, and the run's cost is their sum
    results = ek.http.get(f"/api/evals/runs/{run['id']}/results").json()["data"]
    assert len(results) == 6
    total = 0.0
    for r in results:
        trace = ek.wait_for_trace(r["trace_id"])
        assert trace["model"] == "gpt-4o-mini" and trace["cost_usd"] > 0
        assert "keel-eval" in trace["tags"]
        assert r["cost_usd"] == pytest.approx(trace["cost_usd"])
        total += trace["cost_usd"]
    assert run["cost_usd"] == pytest.approx(total) and total > 0
    listed = ek.http.get("/api/evals/runs", params={"suite": "run-test"}).json()
    assert run["id"] in [x["id"] for x in listed]


def test_a_rerun_is_served_from_the_output_cache(
    ek: Keel, mock_upstream: MockProvider, tmp_path: Path
) -> None:
    _push(ek, "cached", _items(5, "c"))
    first = _execute(ek, _suite("cached"), cache_dir=tmp_path)
    assert first.calls == 5 and first.cache_hits == 0
    before = len([r for r in mock_upstream.requests if r.path.endswith("/chat/completions")])
    second = _execute(ek, _suite("cached"), cache_dir=tmp_path)
    after = len([r for r in mock_upstream.requests if r.path.endswith("/chat/completions")])
    assert second.calls == 0 and second.cache_hits == 5
    assert after == before  # no model call reached the upstream
    assert second.run["summary"]["variants"]["plain/gpt-4o-mini"]["cached"] == 5
    assert second.run["summary"]["variants"]["plain/gpt-4o-mini"]["scores"]["exact"]["mean"] == 1.0
    assert second.run["cost_usd"] == 0.0
    # another parameter is another cache key
    third = _execute(ek, _suite("cached", params={"temperature": 0.5}), cache_dir=tmp_path)
    assert third.calls == 5 and third.cache_hits == 0


@pytest.mark.parametrize("limit", [1, 3, 6])
def test_concurrency_is_bounded_at_the_upstream(
    ek: Keel, counting: tuple[CountingUpstream, ServerThread], limit: int
) -> None:
    up, _ = counting
    if not ek.http.get(f"/api/datasets/slow-{ek.backend}").status_code == 200:
        _push(ek, f"slow-{ek.backend}", _items(12, "s"))
    up.reset()
    report = _execute(
        ek,
        _suite(
            f"slow-{ek.backend}", models=["counted"], scorers=["contains"], concurrency=limit, cache=False
        ),
    )
    assert report.run["result_count"] == 12 and report.calls == 12
    assert up.total == 12
    assert up.peak <= limit
    if limit > 1:  # calls of 150 ms each do overlap (the exact peak is the benchmark's business)
        assert up.peak > 1


def test_repeats_give_one_result_per_repeat(ek: Keel, tmp_path: Path) -> None:
    _push(ek, "repeats", _items(3, "r"))
    report = _execute(ek, _suite("repeats", repeats=3), cache_dir=tmp_path)
    rows = ek.http.get(f"/api/evals/runs/{report.run['id']}/results").json()["data"]
    assert len(rows) == 9
    assert sorted({(r["item_id"], r["repeat"]) for r in rows}) == [
        (f"r{i}", rep) for i in range(3) for rep in range(3)
    ]
    s = report.run["summary"]["variants"]["plain/gpt-4o-mini"]
    assert s["results"] == 9 and s["items"] == 3
    assert s["scores"]["exact"]["n"] == 3 and s["scores"]["exact"]["repeat_stdev"] == 0.0
    # each repeat is its own cache entry: a rerun hits all nine
    again = _execute(ek, _suite("repeats", repeats=3), cache_dir=tmp_path)
    assert again.cache_hits == 9 and again.calls == 0


def test_failed_calls_are_retried(ek: Keel, mock_upstream: MockProvider) -> None:
    _push(ek, "retry", _items(1, "x"))
    # two upstream 500s: the gateway's own retry uses both and answers 502; the runner retries that
    mock_upstream.set_fault("500", times=2)
    try:
        report = _execute(ek, _suite("retry", concurrency=1, cache=False))
    finally:
        mock_upstream.set_fault(None)
    assert report.retries == 1 and report.calls == 2
    rows = ek.http.get(f"/api/evals/runs/{report.run['id']}/results").json()["data"]
    assert rows[0]["error"] is None and rows[0]["scores"]["exact"]["value"] == 1.0


def test_retries_exhausted_is_an_error_result_not_a_crash(ek: Keel) -> None:
    _push(ek, "dead", _items(2, "d"))
    report = _execute(ek, _suite("dead", models=["fault-500"], retries=1, cache=False))
    v = report.run["summary"]["variants"]["plain/fault-500"]
    assert v["errors"] == 2 and v["scores"]["exact"]["errors"] == 2 and v["scores"]["exact"]["mean"] is None
    rows = ek.http.get(f"/api/evals/runs/{report.run['id']}/results").json()["data"]
    assert all(r["error"].startswith("HTTP 502") for r in rows)
    assert report.retries == 2


def test_registry_prompts_and_render_errors(ek: Keel, tmp_path: Path) -> None:
    r = ek.http.post(
        "/api/prompts",
        params={"project": "default"},
        json={
            "name": "eval-greeter",
            "type": "chat",
            "messages": [{"role": "user", "content": "{{ q }}"}],
            "labels": ["production"],
        },
    )
    assert r.status_code in (200, 201), r.text
    _push(ek, "registry", [*_items(2, "g"), {"id": "broken", "input": {"other": "x"}, "expected": "y"}])
    suite = _suite("registry", prompts=[{"prompt": "eval-greeter@production"}])
    report = _execute(ek, suite, cache_dir=tmp_path)
    v = report.run["summary"]["variants"]["eval-greeter/gpt-4o-mini"]
    assert v["scores"]["exact"]["mean"] == 1.0 and v["errors"] == 1
    rows = ek.http.get(f"/api/evals/runs/{report.run['id']}/results").json()["data"]
    broken = next(r for r in rows if r["item_id"] == "broken")
    assert "render_error" in broken["error"] and "q" in broken["error"]
    assert report.run["config"]["variants"][0]["prompt"] == {
        "name": "eval-greeter",
        "version": 1,
        "ref": "production",
    }


# -- the dataset API ------------------------------------------------------------------------------------


def test_dataset_versions_import_export(ek: Keel) -> None:
    name = "versions"
    ds = _push(ek, name, [{"id": "a", "input": "x", "expected": "1"}])
    assert ds["version"] == 1 and ds["added"] == 1
    r = ek.http.post(
        f"/api/datasets/{name}/import",
        params={"format": "csv"},
        content=b"id,input,expected\na,x,2\nb,y,3\n",
        headers={"content-type": "text/csv"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["added"], r.json()["updated"]) == (2, 1, 1)
    v1 = ek.http.get(f"/api/datasets/{name}/items", params={"version": 1}).json()
    v2 = ek.http.get(f"/api/datasets/{name}/items").json()
    assert [(i["id"], i["expected"]) for i in v1["data"]] == [("a", "1")]
    assert sorted((i["id"], i["expected"]) for i in v2["data"]) == [("a", "2"), ("b", "3")]
    r = ek.http.delete(f"/api/datasets/{name}/items/b")
    assert r.status_code == 200 and r.json()["version"] == 3
    exported = ek.http.get(f"/api/datasets/{name}/export", params={"format": "jsonl", "version": 2})
    assert exported.headers["x-keel-dataset-version"] == "2"
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    assert len(exported.text.splitlines()) == 2
    yaml_out = ek.http.get(f"/api/datasets/{name}/export", params={"format": "yaml"}).text
    assert "id: a" in yaml_out and "id: b" not in yaml_out
    listed = {d["name"]: d for d in ek.http.get("/api/datasets").json()}
    assert listed[name]["item_count"] == 1 and listed[name]["version"] == 3


def test_dataset_api_errors_are_4xx(ek: Keel) -> None:
    _push(ek, "errs", [{"input": "x"}])
    cases = [
        ek.http.post("/api/datasets", json={"name": "errs"}),
        ek.http.post("/api/datasets", json={"name": "bad name!"}),
        ek.http.post("/api/datasets/errs/items", json={"items": [{"expected": "no input"}]}),
        ek.http.post("/api/datasets/errs/import", params={"format": "jsonl"}, content=b"{nope\n"),
        ek.http.get("/api/datasets/errs/items", params={"version": 99}),
        ek.http.get("/api/datasets/missing"),
        ek.http.get("/api/evals/runs/missing"),
        ek.http.get("/api/evals/compare", params={"base": "missing", "head": "missing"}),
        ek.http.post("/api/datasets/errs/items/from-traces", json={"trace_ids": ["0" * 32]}),
        ek.http.post("/api/datasets/errs/items/from-traces", json={"trace_ids": ["xyz"]}),
    ]
    assert [c.status_code for c in cases] == [409, 400, 400, 400, 404, 404, 404, 404, 404, 400]
    for c in cases:
        assert set(c.json()["error"]) >= {"message", "type", "code"}
    assert "line 1" in cases[3].json()["error"]["message"]


def test_items_from_traces(ek: Keel) -> None:
    r = ek.http.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "from a trace"}]},
    )
    assert r.status_code == 200
    tid = r.headers["x-keel-trace-id"]
    ek.wait_for_trace(tid)
    r = ek.http.post("/api/datasets/from-prod/items/from-traces", json={"trace_ids": [tid]})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 1 and r.json()["version"] == 1
    item = ek.http.get("/api/datasets/from-prod/items").json()["data"][0]
    assert item["input"] == {"messages": [{"role": "user", "content": "from a trace"}]}
    assert item["expected"] == "Mock reply to: from a trace" and item["source_trace_id"] == tid
    # adding the same trace again changes nothing
    again = ek.http.post("/api/datasets/from-prod/items/from-traces", json={"trace_ids": [tid]}).json()
    assert again["version"] == 1 and again["unchanged"] == 1
    # a replay suite: the item's messages fill a placeholder
    report = _execute(
        ek,
        _suite(
            "from-prod",
            prompts=[{"name": "replay", "messages": [{"placeholder": "messages"}]}],
            scorers=["exact"],
            cache=False,
        ),
    )
    assert report.run["summary"]["variants"]["replay/gpt-4o-mini"]["scores"]["exact"]["mean"] == 1.0
