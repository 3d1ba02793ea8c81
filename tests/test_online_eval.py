"""Online evaluation (keel.evals.online): rules over live gateway traffic on both backends.

Real requests go through keel with the official openai SDK; the background evaluator in the keel
server samples the matching traces (deterministically by trace id), scores them with a judge (a
scripted model at the mock upstream, called through the gateway) and writes ``eval`` scores on the
traces. Also: judge traces are never scored, malformed judge output is counted and writes nothing,
two evaluators on one database never score a span twice, sampled traces can go to a review queue.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import orjson
import pytest

from keel.evals.online import OnlineEvaluator, retrieved_contexts, sampled, span_io
from keel.evals.scorers.judge import JUDGE_TAG
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import JUDGES, admin_key, gateway_client, start_keel

RUBRIC = "Is the reply helpful?"


@pytest.fixture(scope="module", params=BACKENDS)
def ok(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    k = start_keel(
        request.param, tmp_path_factory.mktemp("online"), mock_upstream, request, online_eval_interval_s=0.1
    )
    yield k
    k.http.close()
    k.server.stop()


def judge_says(mock: MockProvider, reply: Callable[[dict[str, Any]], str]) -> None:
    mock.script(JUDGES["judge"], reply)


def chat(
    k: Keel, n: int, *, tags: str | None = None, model: str = "gpt-4o-mini", user: str | None = None
) -> list[str]:
    """n chat completions through the gateway; their trace ids."""
    client = openai.OpenAI(base_url=k.url + "/v1", api_key=k.master_key, max_retries=0, timeout=30)
    headers = {"x-keel-tags": tags} if tags else {}
    out = []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": f"question {i} {uuid.uuid4().hex[:6]}"}],
            extra_headers=headers,
            **({"user": user} if user else {}),
        )
        out.append(raw.headers["x-keel-trace-id"])
    client.close()
    return out


def rule(k: Keel, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "rule-" + uuid.uuid4().hex[:6])
    r = k.http.post("/api/online-rules", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def eval_scores(k: Keel, name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"name": name, "source": "eval", "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = k.http.get("/api/scores", params=params).json()
        out.extend(page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            return out


def wait_until(check: Callable[[], Any], what: str, timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rule_state(k: Keel, rule_id: str) -> dict[str, Any]:
    return dict(k.http.get(f"/api/online-rules/{rule_id}").json())


def test_rule_scores_a_sampled_half_of_matching_live_traffic(ok: Keel, mock_upstream: MockProvider) -> None:
    judge_says(mock_upstream, lambda req: '{"reasoning": "helpful", "score": 4}')
    tag = "g2-online-" + uuid.uuid4().hex[:6]
    score_name = "helpfulness_" + uuid.uuid4().hex[:6]
    r = rule(
        ok,
        filter={"tags": [tag], "model": "gpt-4o-mini"},
        sample_rate=0.5,
        scorers=[{"type": "judge", "name": score_name, "model": "judge", "rubric": RUBRIC}],
    )
    matching = chat(ok, 60, tags=tag)
    other_tag = chat(ok, 5, tags="not-" + tag)
    other_model = chat(ok, 5, tags=tag, model="cheap")
    expected = {t for t in matching if sampled(r["id"], t, 0.5)}
    # binomial(60, 0.5): mean 30, sd 3.9 — the deterministic hash lands well inside 4 sd
    assert 14 <= len(expected) <= 46

    def done() -> bool:
        st = rule_state(ok, r["id"])
        return st["matched"] >= 60 and st["scored"] >= len(expected)

    wait_until(done, "the rule to score its sample")
    scores = eval_scores(ok, score_name)
    scored = {s["trace_id"] for s in scores}
    assert scored == expected  # exactly the sampled ones, each once
    assert len(scores) == len(expected)
    assert not scored & set(other_tag + other_model)
    for s in scores:
        assert s["value"] == pytest.approx(0.75) and s["data_type"] == "numeric"
        assert s["author"] == f"online:{r['id']}" and s["comment"] == "helpful" and s["span_id"]
    st = rule_state(ok, r["id"])
    assert (st["matched"], st["sampled"], st["scored"], st["errors"]) == (60, len(expected), len(expected), 0)
    # the scores show on the trace
    one = next(iter(expected))
    trace = ok.http.get(f"/api/traces/{one}").json()
    assert any(s["name"] == score_name for s in trace.get("scores", [])), trace.get("scores")
    ok.http.delete(f"/api/online-rules/{r['id']}")


def test_judge_traces_are_never_scored(ok: Keel, mock_upstream: MockProvider) -> None:
    judge_says(mock_upstream, lambda req: '{"score": 5}')
    score_name = "everything_" + uuid.uuid4().hex[:6]
    r = rule(
        ok,
        sample_rate=1.0,
        filter={"user": "g2-everyone"},
        scorers=[{"type": "judge", "name": score_name, "model": "judge", "rubric": RUBRIC}],
    )
    everything = rule(
        ok,
        sample_rate=1.0,
        scorers=[{"type": "judge", "name": score_name + "_all", "model": "judge", "rubric": "x"}],
    )
    ids = chat(ok, 3, user="g2-everyone")
    wait_until(lambda: rule_state(ok, r["id"])["scored"] >= 3, "three scores")
    assert {s["trace_id"] for s in eval_scores(ok, score_name)} == set(ids)
    wait_until(lambda: rule_state(ok, everything["id"])["scored"] >= 3, "the catch-all rule")
    ok.http.delete(f"/api/online-rules/{everything['id']}")
    ok.http.delete(f"/api/online-rules/{r['id']}")
    judged = ok.http.get("/api/traces", params={"tag": JUDGE_TAG, "limit": 200}).json()["data"]
    assert judged
    all_scored = {s["trace_id"] for s in eval_scores(ok, score_name + "_all")}
    assert set(ids) <= all_scored
    assert not all_scored & {t["trace_id"] for t in judged}  # the judges' own calls are not scored


def test_malformed_judge_output_is_counted_not_stored(ok: Keel, mock_upstream: MockProvider) -> None:
    judge_says(mock_upstream, lambda req: "I refuse to answer in JSON.")
    score_name = "broken_" + uuid.uuid4().hex[:6]
    r = rule(
        ok,
        sample_rate=1.0,
        filter={"user": "g2-broken"},
        scorers=[{"type": "judge", "name": score_name, "model": "judge", "rubric": RUBRIC, "max_retries": 1}],
    )
    chat(ok, 4, user="g2-broken")
    wait_until(lambda: rule_state(ok, r["id"])["errors"] >= 4, "four judge errors")
    st = rule_state(ok, r["id"])
    assert (st["sampled"], st["scored"], st["errors"]) == (4, 0, 4)
    assert eval_scores(ok, score_name) == []
    judge_calls = [q for q in mock_upstream.requests if (q.json or {}).get("model") == "script:g2-judge"]
    assert (
        sum("refuse" in orjson.dumps(q.json).decode() for q in judge_calls) >= 4
    )  # retried with the bad answer
    metrics = ok.http.get("/metrics").text
    assert "keel_online_eval_errors" in metrics
    ok.http.delete(f"/api/online-rules/{r['id']}")


def test_two_evaluators_never_score_a_span_twice(ok: Keel, mock_upstream: MockProvider) -> None:
    """Replicas share the database: the watermark compare-and-set gives each batch to one of them."""
    judge_says(mock_upstream, lambda req: '{"score": 3}')
    score_name = "replicas_" + uuid.uuid4().hex[:6]
    r = rule(
        ok,
        sample_rate=1.0,
        filter={"user": "g2-replicas"},
        scorers=[{"type": "judge", "name": score_name, "model": "judge", "rubric": RUBRIC}],
        enabled=False,  # the server's own evaluator leaves it alone; two evaluators of this test run it
    )
    ids = chat(ok, 12, user="g2-replicas")
    wait_until(lambda: all(ok.http.get(f"/api/traces/{t}").status_code == 200 for t in ids), "traces stored")
    put = ok.http.put(
        f"/api/online-rules/{r['id']}",
        json={
            "name": r["name"],
            "sample_rate": 1.0,
            "filter": {"user": "g2-replicas"},
            "scorers": r["scorers"],
            "enabled": True,
        },
    )
    assert put.status_code == 200, put.text
    # the server's evaluator may now join in too: three evaluators race for the same spans

    async def race() -> None:
        async with gateway_client(ok) as a, gateway_client(ok) as b:
            evs = [OnlineEvaluator(ok.store, http, batch_size=5) for http in (a, b)]
            for _ in range(8):
                await asyncio.gather(*(e.tick() for e in evs))

    asyncio.run(race())
    wait_until(lambda: rule_state(ok, r["id"])["scored"] >= 12, "all twelve scored")
    scores = eval_scores(ok, score_name)
    assert sorted(s["trace_id"] for s in scores) == sorted(ids)  # each exactly once
    ok.http.delete(f"/api/online-rules/{r['id']}")


def test_sampled_traces_go_to_a_review_queue(ok: Keel) -> None:
    q = ok.http.post("/api/annotation-queues", json={"name": "online-q", "score_name": "quality"}).json()
    r = rule(ok, sample_rate=1.0, filter={"user": "g2-queue"}, queue_id=q["id"])
    ids = chat(ok, 3, user="g2-queue")
    items = wait_until(
        lambda: (
            len(ok.http.get(f"/api/annotation-queues/{q['id']}/items").json()) >= 3
            and ok.http.get(f"/api/annotation-queues/{q['id']}/items").json()
        ),
        "queued traces",
    )
    assert {i["trace_id"] for i in items} == set(ids)
    assert {i["source"] for i in items} == {r["id"]} and {i["status"] for i in items} == {"pending"}
    ok.http.delete(f"/api/online-rules/{r['id']}")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "x", "sample_rate": 1.5}, 400, "sample_rate"),
        ({"name": "x", "sample_rate": 0.5, "scorers": [{"type": "nope"}]}, 400, "unknown scorer type"),
        ({"name": "x", "sample_rate": 0.5, "scorers": [{"type": "judge", "model": "judge"}]}, 400, "rubric"),
        ({"name": "x", "sample_rate": 0.5, "filter": {"colour": "red"}}, 400, "filter.colour"),
        ({"name": "x", "sample_rate": 0.5, "filter": {"status": "maybe"}}, 400, "filter.status"),
        ({"name": "x", "sample_rate": 0.5, "queue_id": "aq_missing"}, 400, "queue"),
        ({"name": "x", "sample_rate": 0.5, "project": "no-such-project"}, 404, "project"),
    ],
)
def test_bad_rules_are_refused(ok: Keel, body: dict[str, Any], status: int, needle: str) -> None:
    r = ok.http.post("/api/online-rules", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_rules_are_scoped_to_a_project(ok: Keel) -> None:
    mine = admin_key(ok, "g2-proj-a")
    theirs = admin_key(ok, "g2-proj-b")
    plain = ok.create_key(project="g2-proj-a")["key"]  # gateway/ingest/read: may not manage rules
    refused = httpx.post(
        ok.url + "/api/online-rules",
        json={"name": "nope", "sample_rate": 0.1},
        headers={"authorization": f"Bearer {plain}"},
    )
    assert refused.status_code == 403, refused.text
    created = httpx.post(
        ok.url + "/api/online-rules",
        json={"name": "a-rule", "sample_rate": 0.1},
        headers={"authorization": f"Bearer {mine}"},
    )
    assert created.status_code == 201 and created.json()["project_id"]
    rid = created.json()["id"]
    other = httpx.get(ok.url + f"/api/online-rules/{rid}", headers={"authorization": f"Bearer {theirs}"})
    assert other.status_code == 404
    listed = httpx.get(ok.url + "/api/online-rules", headers={"authorization": f"Bearer {theirs}"}).json()
    assert rid not in {x["id"] for x in listed}
    assert rid in {x["id"] for x in ok.http.get("/api/online-rules").json()}
    assert ok.http.delete(f"/api/online-rules/{rid}").status_code == 200
    assert ok.http.get(f"/api/online-rules/{rid}").status_code == 404


def test_sampling_is_deterministic_and_uniform() -> None:
    ids = [uuid.UUID(int=i * 7919 + 13).hex for i in range(4000)]
    picked = [t for t in ids if sampled("rule_x", t, 0.25)]
    assert picked == [t for t in ids if sampled("rule_x", t, 0.25)]
    assert 900 <= len(picked) <= 1100  # 1000 expected, sd 27
    assert all(sampled("r", t, 1.0) for t in ids[:10]) and not any(sampled("r", t, 0.0) for t in ids[:10])
    # another rule samples independently
    other = {t for t in ids if sampled("rule_y", t, 0.25)}
    assert 150 <= len(other & set(picked)) <= 350  # 250 expected if independent


def test_span_io_reads_openai_and_anthropic_spans() -> None:
    q, a, msgs, tools = span_io(
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
        {
            "choices": [
                {
                    "message": {
                        "content": "hello",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                    }
                }
            ]
        },
    )
    assert (q, a, len(msgs), tools) == ("hi", "hello", 2, [{"name": "f", "arguments": "{}"}])
    q, a, msgs, tools = span_io(
        {"system": "s", "messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]},
        {
            "type": "message",
            "content": [
                {"type": "text", "text": "hey"},
                {"type": "tool_use", "name": "g", "input": {"x": 1}},
            ],
        },
    )
    assert (q, a, msgs[0]["role"], tools) == ("yo", "hey", "system", [{"name": "g", "arguments": {"x": 1}}])
    assert span_io(None, None) == ("", "", [], [])


def test_rag_scorers_read_the_traces_retrieved_documents(ok: Keel, mock_upstream: MockProvider) -> None:
    """A traced RAG pipeline (retriever span + LLM span, as the SDK or OTLP ingest store them)."""

    def annotator(req: dict[str, Any]) -> str:
        prompt = req["messages"][1]["content"]
        if prompt.startswith("Break the TEXT"):
            text = prompt.split("TEXT: ", 1)[1].rsplit("\n\nAnswer", 1)[0]
            return orjson.dumps({"claims": [c for c in text.split(". ") if c]}).decode()
        context = prompt.split("CONTEXT:\n", 1)[1].split("\n\nCLAIM: ", 1)[0]
        claim = prompt.split("CLAIM: ", 1)[1].rsplit("\n\nAnswer", 1)[0].rstrip(".")
        return orjson.dumps({"verdict": claim in context}).decode()

    mock_upstream.script(JUDGES["rag-judge"], annotator)
    score_name = "faithful_" + uuid.uuid4().hex[:6]
    r = rule(
        ok,
        sample_rate=1.0,
        filter={"user": "g2-rag-online"},
        scorers=[{"type": "faithfulness", "name": score_name, "model": "rag-judge"}],
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    tid = uuid.uuid4().hex
    base = {"trace_id": tid, "start_time": now, "end_time": now, "latency_ms": 5.0, "status": "ok"}
    ok.store.write_spans(
        [
            {
                **base,
                "span_id": uuid.uuid4().hex[:16],
                "name": "retrieve",
                "kind": "retriever",
                "output": {
                    "documents": [{"content": "Paris is the capital of France."}, {"content": "Lyon."}]
                },
            },
            {
                **base,
                "span_id": uuid.uuid4().hex[:16],
                "name": "chat",
                "kind": "llm",
                "model": "gpt-4o-mini",
                "requested_model": "gpt-4o-mini",
                "user": "g2-rag-online",
                "input": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
                "output": {
                    "role": "assistant",
                    "content": "Paris is the capital of France. It has 90 million people.",
                },
            },
        ]
    )
    wait_until(lambda: rule_state(ok, r["id"])["scored"] >= 1, "the faithfulness score")
    [score] = eval_scores(ok, score_name)
    assert score["trace_id"] == tid and score["value"] == pytest.approx(0.5)
    assert score["comment"] == "1 of 2 claims supported by the contexts"
    ok.http.delete(f"/api/online-rules/{r['id']}")


def test_retrieved_contexts_shapes() -> None:
    assert retrieved_contexts(
        [
            {"documents": [{"content": "a"}, {"page_content": "b"}, "c", {"id": 1}]},
            ["d", {"text": "e"}],
            None,
            "f",
        ]
    ) == ["a", "b", "c", "d", "e", "f"]
    assert len(retrieved_contexts([[str(i) for i in range(50)]])) == 20
