"""LLM-as-judge (keel.evals.scorers.judge): scripted judge outputs at the mock upstream, called through a
real keel gateway on both backends — valid verdicts, malformed ones (retried, counted, then judge_error),
the cache key (judge model + prompt), G-Eval auto steps, and configuration errors."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext
from keel.evals.scorers.judge import (
    JUDGE_ERROR,
    JUDGE_TAG,
    JudgeClient,
    JudgeVerdict,
    RubricJudge,
    parse_json_reply,
)
from keel.evals.scorers.registry import build_scorer
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import JUDGES, gateway_client, start_keel

RUBRIC = "Is the answer factually correct and does it answer the question?"
ITEM = ScoreInput(output="Paris is the capital of France.", input="What is the capital of France?")


@pytest.fixture(scope="module", params=BACKENDS)
def jk(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    k = start_keel(request.param, tmp_path_factory.mktemp("judge"), mock_upstream, request)
    yield k
    k.http.close()
    k.server.stop()


def script(mock: MockProvider, replies: list[Any], model: str = "judge") -> None:
    mock.script(JUDGES[model], [r if isinstance(r, str) else orjson.dumps(r).decode() for r in replies])


def judge_requests(mock: MockProvider, model: str = "judge") -> list[dict[str, Any]]:
    return [
        r.json
        for r in mock.requests
        if isinstance(r.json, dict) and r.json.get("model") == f"script:{JUDGES[model]}"
    ]


async def run_judge(
    k: Keel, options: dict[str, Any], *items: ScoreInput, ctx: ScorerContext | None = None
) -> Any:
    async with gateway_client(k) as http:
        c = ctx or ScorerContext(http=http)
        c.http = http
        judge = RubricJudge({"model": "judge", "rubric": RUBRIC, **options}, c)
        results = [await judge.score(i) for i in items or (ITEM,)]
    return judge, results


async def test_valid_verdict_is_normalised(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, [{"reasoning": "Correct: Paris.", "score": 4}])
    judge, [res] = await run_judge(jk, {})
    assert res.value == pytest.approx(0.75) and res.label == "4" and res.error is None
    assert res.explanation == "Correct: Paris."
    assert res.details["attempts"] == 1 and res.details["judge_model"] == "judge"
    assert judge.stats.as_dict() == {"calls": 1, "retries": 0, "malformed": 0, "errors": 0, "cache_hits": 0}
    [sent] = judge_requests(mock_upstream)
    prompt = sent["messages"][-1]["content"]
    assert RUBRIC in prompt and ITEM.output in prompt and "What is the capital" in prompt
    assert "Evaluation steps:" in prompt and sent["temperature"] == 0.0


async def test_judge_call_is_traced_with_the_judge_tag(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, [{"reasoning": "ok", "score": 5}])
    marker = "traced " + uuid.uuid4().hex
    await run_judge(jk, {}, ScoreInput(output=marker, input="q"))
    [sent] = judge_requests(mock_upstream)
    assert sent["model"] == "script:g2-judge"
    deadline = time.monotonic() + 15
    while True:
        rows = jk.http.get("/api/traces", params={"tag": JUDGE_TAG, "limit": 200}).json()["data"]
        if rows or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert rows and all(JUDGE_TAG in (r["tags"] or []) for r in rows)
    assert {r["model"] for r in rows} <= set(JUDGES)


async def test_malformed_answer_is_retried_and_counted(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, ["Sure! The score is four.", {"reasoning": "fine", "score": 4}])
    judge, [res] = await run_judge(jk, {})
    assert res.value == pytest.approx(0.75) and res.details["attempts"] == 2
    assert judge.stats.calls == 2 and judge.stats.retries == 1 and judge.stats.malformed == 1
    assert judge.stats.errors == 0
    first, second = judge_requests(mock_upstream)
    # the retry shows the judge its bad answer and what was wrong with it
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": "Sure! The score is four."}
    assert "invalid" in second["messages"][-1]["content"]


async def test_out_of_scale_score_is_a_schema_violation(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, [{"reasoning": "x", "score": 9}, {"reasoning": "x", "score": 2}])
    judge, [res] = await run_judge(jk, {})
    assert res.label == "2" and res.value == pytest.approx(0.25)
    assert judge.stats.malformed == 1
    retry = judge_requests(mock_upstream)[-1]["messages"][-1]["content"]
    assert "score" in retry and "less than or equal to 5" in retry


async def test_persistently_malformed_judge_is_judge_error(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, ["{not json", '{"score": "high"}', "[1, 2]", "never used"])
    judge, [res] = await run_judge(jk, {"max_retries": 2})
    assert res.value is None and res.error == JUDGE_ERROR and res.passed is None
    assert "malformed judge answer" in (res.explanation or "")
    assert res.details["attempts"] == 3
    assert judge.stats.as_dict() == {"calls": 3, "retries": 2, "malformed": 3, "errors": 1, "cache_hits": 0}
    assert len(judge_requests(mock_upstream)) == 3  # bounded: the 4th scripted reply is never asked for
    mock_upstream.script(JUDGES["judge"], None)


async def test_unreachable_judge_is_judge_error(jk: Keel, mock_upstream: MockProvider) -> None:
    script(mock_upstream, [])  # the mock answers 400 script_exhausted through the gateway
    judge, [res] = await run_judge(jk, {"max_retries": 1})
    assert res.error == JUDGE_ERROR and res.value is None
    assert "judge model judge answered 400" in (res.explanation or "")
    assert judge.stats.calls == 2 and judge.stats.errors == 1 and judge.stats.malformed == 0


async def test_reply_in_code_fence_or_prose_is_accepted(jk: Keel, mock_upstream: MockProvider) -> None:
    script(
        mock_upstream,
        [
            '```json\n{"reasoning": "a", "score": 1}\n```',
            'Here you go: {"reasoning": "b", "score": 5} Thanks.',
        ],
    )
    judge, [a, b] = await run_judge(jk, {}, ScoreInput(output="one"), ScoreInput(output="two"))
    assert (a.value, b.value) == (0.0, 1.0) and judge.stats.retries == 0


async def test_cache_key_has_judge_model_and_prompt(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    cache: dict[str, Any] = {}
    script(mock_upstream, [{"score": 3}, {"score": 5}])
    script(mock_upstream, [{"score": 1}], model="judge-b")
    async with gateway_client(jk) as http:
        ctx = ScorerContext(http=http, cache=cache)
        a = RubricJudge({"model": "judge", "rubric": RUBRIC}, ctx)
        first = await a.score(ITEM)
        again = await a.score(ITEM)  # same model, same prompt: cached
        assert (first.label, again.label) == ("3", "3") and again.details["attempts"] == 0
        assert a.stats.cache_hits == 1 and a.stats.calls == 1
        other_rubric = RubricJudge({"model": "judge", "rubric": RUBRIC + " Be terse."}, ctx)
        assert (await other_rubric.score(ITEM)).label == "5"  # new prompt: asked again
        other_model = RubricJudge({"model": "judge-b", "rubric": RUBRIC}, ctx)
        assert (await other_model.score(ITEM)).label == "1"  # new judge model: asked again
    assert len(judge_requests(mock_upstream)) == 2 and len(judge_requests(mock_upstream, "judge-b")) == 1
    c1 = JudgeClient(object(), "judge")
    c2 = JudgeClient(object(), "judge-b")
    msgs = [{"role": "user", "content": "x"}]
    assert c1.cache_key(msgs, JudgeVerdict) != c2.cache_key(msgs, JudgeVerdict)
    assert c1.cache_key(msgs, JudgeVerdict) != c1.cache_key([{"role": "user", "content": "y"}], JudgeVerdict)


async def test_malformed_answers_are_never_cached(jk: Keel, mock_upstream: MockProvider) -> None:
    cache: dict[str, Any] = {}
    script(mock_upstream, ["nope", "nope", "nope", {"score": 2}])
    async with gateway_client(jk) as http:
        ctx = ScorerContext(http=http, cache=cache)
        judge = RubricJudge({"model": "judge", "rubric": RUBRIC + " uncached", "max_retries": 2}, ctx)
        assert (await judge.score(ITEM)).error == JUDGE_ERROR
        assert not any(k.startswith("judge:") for k in cache)
        second = await judge.score(ITEM)
    assert second.label == "2" and judge.stats.errors == 1


async def test_geval_auto_steps_are_written_once(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    steps = ["Check the capital named.", "Check it answers the question."]
    script(mock_upstream, [{"steps": steps}, {"score": 5}, {"score": 1}])
    _, [a, b] = await run_judge(
        jk, {"steps": "auto", "scale": "1-5"}, ScoreInput(output="Paris"), ScoreInput(output="Lyon")
    )
    assert (a.label, b.label) == ("5", "1")
    sent = judge_requests(mock_upstream)
    assert len(sent) == 3 and "evaluation steps" in sent[0]["messages"][-1]["content"]
    for req in sent[1:]:
        assert (
            "1. Check the capital named.\n2. Check it answers the question." in req["messages"][-1]["content"]
        )


async def test_custom_scale_and_include(jk: Keel, mock_upstream: MockProvider) -> None:
    mock_upstream.reset()
    script(mock_upstream, [{"score": 0}])
    item = ScoreInput(output="42", input="secret question", expected="41", contexts=["doc one"])
    _, [res] = await run_judge(jk, {"scale": [0, 10], "include": ["expected"], "steps": ["Compare."]}, item)
    assert res.value == 0.0 and not math.isnan(res.value)
    prompt = judge_requests(mock_upstream)[0]["messages"][-1]["content"]
    assert "Expected output:\n41" in prompt and "secret question" not in prompt and "doc one" not in prompt
    assert "integer from 0 to 10" in prompt and "1. Compare." in prompt


def test_registered_through_the_plugin_hook() -> None:
    judge = build_scorer(
        "judge", {"model": "judge", "rubric": "x"}, ScorerContext(http=object()), name="quality"
    )
    assert isinstance(judge, RubricJudge) and judge.name == "quality"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "judge"}, "rubric"),
        ({"rubric": "x"}, "model"),
        ({"model": "judge", "rubric": "x", "scale": [5, 1]}, "maximum must be above"),
        ({"model": "judge", "rubric": "x", "scale": "high"}, "scale"),
        ({"model": "judge", "rubric": "x", "max_retries": 50}, "max_retries"),
        ({"model": "judge", "rubric": "x", "include": ["output"]}, "include"),
        ({"model": "judge", "rubric": "x", "colour": "red"}, "unknown option"),
    ],
)
def test_bad_configuration(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ScorerConfigError, match=message):
        RubricJudge(options, ScorerContext(http=object()))


def test_no_gateway_is_a_configuration_error() -> None:
    with pytest.raises(ScorerConfigError, match="gateway"):
        RubricJudge({"model": "judge", "rubric": "x"}, ScorerContext())


def test_parse_json_reply() -> None:
    assert parse_json_reply('{"score": 3, "extra": 1}', JudgeVerdict).score == 3
    assert parse_json_reply('```\n{"score": 2}\n```', JudgeVerdict).score == 2
    for bad, why in (("", "not a JSON object"), ("[1]", "must be a JSON object"), ('{"x": 1}', "score")):
        with pytest.raises(ValueError, match=why):
            parse_json_reply(bad, JudgeVerdict)


def test_mock_provider_scripts_replies(mock_upstream: MockProvider) -> None:
    """The generic script feature of keel.testing the judge tests rely on (both wire formats)."""
    sid = "g2-script-" + uuid.uuid4().hex[:6]
    r = httpx.post(mock_upstream.url + "/_mock/script", json={"id": sid, "replies": ["first", {"score": 2}]})
    assert r.json() == {"id": sid, "queued": 2}
    body = {"model": f"script:{sid}", "messages": [{"role": "user", "content": "x"}]}
    chat = httpx.post(
        mock_upstream.base_url + "/chat/completions",
        json={**body, "response_format": {"type": "json_object"}},
    )
    assert chat.json()["choices"][0]["message"]["content"] == "first"
    msg = httpx.post(mock_upstream.url + "/v1/messages", json={**body, "max_tokens": 1})
    assert msg.json()["content"] == [{"type": "text", "text": '{"score":2}'}]
    gone = httpx.post(mock_upstream.base_url + "/chat/completions", json=body)
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "script_exhausted"
    mock_upstream.script(sid, lambda req: req["messages"][-1]["content"].upper())
    assert (
        httpx.post(mock_upstream.base_url + "/chat/completions", json=body).json()["choices"][0]["message"][
            "content"
        ]
        == "X"
    )
    mock_upstream.script(sid, None)
    unknown = httpx.post(mock_upstream.base_url + "/chat/completions", json=body)
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "script_unknown"
    bad = httpx.post(mock_upstream.url + "/_mock/script", json={"id": sid})
    assert bad.status_code == 400
