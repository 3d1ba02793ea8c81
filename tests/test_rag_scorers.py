"""RAG scorers (keel.evals.scorers.rag) with the RAGAS definitions, through a real keel gateway on both
backends. The judge is a scripted model at the mock upstream that reads each prompt and answers as a
careful annotator would (a function of the request, since claims are checked concurrently); answer
relevancy embeds with the real local MiniLM (in-process and through the gateway)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext
from keel.evals.scorers.judge import JUDGE_ERROR
from keel.evals.scorers.rag import (
    AnswerRelevancy,
    ContextPrecision,
    ContextRecall,
    Faithfulness,
    average_precision,
    cosine,
)
from keel.evals.scorers.registry import build_scorer
from keel.providers.local_embeddings import LocalEmbeddings
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import JUDGES, gateway_client, start_keel

CONTEXTS = [
    "Paris is the capital of France. It lies on the Seine.",
    "Bananas are rich in potassium.",
    "France is a country in Western Europe.",
]
QUESTION = "What is the capital of France, and where is it?"


def annotator(req: dict[str, Any]) -> str:
    """The scripted judge: splits texts into sentences, and checks claims by substring of the context."""
    prompt = req["messages"][1]["content"]  # the question (a retry appends a correction after it)
    if prompt.startswith("Break the TEXT"):
        text = prompt.split("TEXT: ", 1)[1].rsplit("\n\nAnswer", 1)[0]
        if "MALFORMED" in text:
            return "I would rather not."
        claims = [c.strip() for c in re.split(r"(?<=\.)\s+", text) if c.strip() and "don't know" not in c]
        return orjson.dumps({"claims": claims}).decode()
    if prompt.startswith("Can the CLAIM"):
        context = prompt.split("CONTEXT:\n", 1)[1].split("\n\nCLAIM: ", 1)[0]
        claim = prompt.split("CLAIM: ", 1)[1].rsplit("\n\nAnswer", 1)[0].rstrip(".")
        if "BROKEN" in claim:
            return '{"verdict": "maybe"}'
        return orjson.dumps({"reason": "checked", "verdict": claim in context}).decode()
    if prompt.startswith("Was the CONTEXT useful"):
        context = prompt.split("CONTEXT: ", 1)[1].rsplit("\n\nAnswer", 1)[0]
        return orjson.dumps({"verdict": "Paris" in context or "Seine" in context}).decode()
    if prompt.startswith("Write "):
        answer = prompt.split("ANSWER: ", 1)[1].rsplit("\n\nAnswer", 1)[0]
        if "don't know" in answer:
            return orjson.dumps({"questions": ["What do you not know?"], "noncommittal": True}).decode()
        if "Paris" in answer:
            qs = ["Which city is the capital of France?", "What is the capital city of France?"]
        else:
            qs = ["How do volcanoes form?", "Why do volcanoes erupt?"]
        return orjson.dumps({"questions": qs, "noncommittal": False}).decode()
    return "unexpected prompt"


@pytest.fixture(scope="module", params=BACKENDS)
def rk(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    mock_upstream.script(JUDGES["rag-judge"], annotator)
    k = start_keel(request.param, tmp_path_factory.mktemp("rag"), mock_upstream, request)
    yield k
    k.http.close()
    k.server.stop()


async def minilm(texts: Sequence[str]) -> list[list[float]]:
    vectors, _ = await LocalEmbeddings().embed(list(texts))
    return vectors


async def score(k: Keel, cls: Any, item: ScoreInput, **options: Any) -> Any:
    async with gateway_client(k) as http:
        scorer = cls({"model": "rag-judge", **options}, ScorerContext(http=http, embed=minilm))
        return await scorer.score(item)


async def test_faithfulness_counts_supported_claims(rk: Keel) -> None:
    answer = "Paris is the capital of France. It lies on the Seine. Paris has 40 million inhabitants."
    res = await score(rk, Faithfulness, ScoreInput(output=answer, input=QUESTION, contexts=CONTEXTS))
    assert res.error is None and res.value == pytest.approx(2 / 3)
    assert [c["supported"] for c in res.details["claims"]] == [True, True, False]
    assert res.explanation == "2 of 3 claims supported by the contexts"


async def test_faithfulness_fully_supported_and_unsupported(rk: Keel) -> None:
    ok = await score(rk, Faithfulness, ScoreInput(output="Bananas are rich in potassium.", contexts=CONTEXTS))
    bad = await score(rk, Faithfulness, ScoreInput(output="The moon is made of cheese.", contexts=CONTEXTS))
    assert (ok.value, bad.value) == (1.0, 0.0)


async def test_faithfulness_without_claims_or_contexts_is_an_explicit_error(rk: Keel) -> None:
    none = await score(rk, Faithfulness, ScoreInput(output="I don't know.", contexts=CONTEXTS))
    assert none.value is None and none.error == "no_claims"
    no_ctx = await score(rk, Faithfulness, ScoreInput(output="Paris."))
    assert no_ctx.value is None and no_ctx.error == "no_contexts"


async def test_malformed_claim_extraction_is_judge_error(rk: Keel) -> None:
    res = await score(
        rk, Faithfulness, ScoreInput(output="MALFORMED answer.", contexts=CONTEXTS), max_retries=1
    )
    assert res.value is None and res.error == JUDGE_ERROR and res.details["attempts"] == 2


async def test_one_malformed_verdict_makes_the_item_judge_error(rk: Keel) -> None:
    item = ScoreInput(output="Paris is the capital of France. BROKEN claim.", contexts=CONTEXTS)
    async with gateway_client(rk) as http:
        scorer = Faithfulness({"model": "rag-judge", "max_retries": 2}, ScorerContext(http=http))
        res = await scorer.score(item)
    assert res.error == JUDGE_ERROR and "verdict" in (res.explanation or "")
    assert scorer.client.stats.errors == 1 and scorer.client.stats.malformed == 3
    assert scorer.client.stats.retries == 2


async def test_context_recall(rk: Keel) -> None:
    item = ScoreInput(
        output="irrelevant",
        input=QUESTION,
        expected="Paris is the capital of France. It lies on the Seine. It hosted the 1900 Olympics.",
        contexts=CONTEXTS,
    )
    res = await score(rk, ContextRecall, item)
    assert res.value == pytest.approx(2 / 3)
    assert [c["attributable"] for c in res.details["claims"]] == [True, True, False]
    missing = await score(rk, ContextRecall, ScoreInput(output="x", contexts=CONTEXTS))
    assert missing.error == "no_reference" and missing.value is None


async def test_context_precision_is_average_precision_over_useful_positions(rk: Keel) -> None:
    item = ScoreInput(output="Paris.", input=QUESTION, expected="Paris, on the Seine.", contexts=CONTEXTS)
    res = await score(rk, ContextPrecision, item)
    assert res.details["useful"] == [True, False, False] and res.value == 1.0
    late = ScoreInput(output="Paris.", input=QUESTION, contexts=[CONTEXTS[1], CONTEXTS[2], CONTEXTS[0]])
    res = await score(rk, ContextPrecision, late)
    assert res.details["useful"] == [False, False, True] and res.value == pytest.approx(1 / 3)
    none = await score(rk, ContextPrecision, ScoreInput(output="x", input="q", contexts=CONTEXTS[1:]))
    assert none.value == 0.0


def test_average_precision_definition() -> None:
    assert average_precision([True, False, True]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([False, True, True]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([]) == 0.0 and average_precision([False]) == 0.0


async def test_answer_relevancy_with_local_minilm(rk: Keel) -> None:
    good = await score(rk, AnswerRelevancy, ScoreInput(output="Paris, on the Seine.", input=QUESTION), n=2)
    off = await score(rk, AnswerRelevancy, ScoreInput(output="Magma rises.", input=QUESTION), n=2)
    assert good.error is None and off.error is None
    assert good.value > 0.7 > 0.3 > off.value
    assert len(good.details["similarities"]) == 2
    evasive = await score(rk, AnswerRelevancy, ScoreInput(output="I don't know.", input=QUESTION))
    assert evasive.value == 0.0 and evasive.details["noncommittal"] is True


async def test_answer_relevancy_through_the_gateway_embeddings(rk: Keel) -> None:
    async with gateway_client(rk) as http:
        scorer = AnswerRelevancy(
            {"model": "rag-judge", "embedding_model": "minilm", "n": 2}, ScorerContext(http=http)
        )
        res = await scorer.score(ScoreInput(output="Paris, on the Seine.", input=QUESTION))
    assert res.error is None and res.value > 0.7
    bad = await score(rk, AnswerRelevancy, ScoreInput(output="Paris."), n=2)
    assert bad.error == "no_question"


async def test_answer_relevancy_embedding_failure_is_reported(rk: Keel) -> None:
    async with gateway_client(rk) as http:
        scorer = AnswerRelevancy(
            {"model": "rag-judge", "embedding_model": "no-such-model"}, ScorerContext(http=http)
        )
        res = await scorer.score(ScoreInput(output="Paris.", input=QUESTION))
    assert res.value is None and res.error == "embedding_error" and "404" in (res.explanation or "")


def test_configuration_errors() -> None:
    local = AnswerRelevancy({"model": "j"}, ScorerContext(http=object()))  # falls back to the local MiniLM
    assert callable(local.embed)
    with pytest.raises(ScorerConfigError, match="between 1 and 10"):
        AnswerRelevancy({"model": "j", "n": 0}, ScorerContext(http=object(), embed=minilm))
    with pytest.raises(ScorerConfigError, match="unknown option"):
        Faithfulness({"model": "j", "rubric": "x"}, ScorerContext(http=object()))
    with pytest.raises(ScorerConfigError, match="model"):
        ContextRecall({}, ScorerContext(http=object()))


def test_registered_names() -> None:
    ctx = ScorerContext(http=object(), embed=minilm)
    for type_, cls in (
        ("faithfulness", Faithfulness),
        ("answer_relevancy", AnswerRelevancy),
        ("context_precision", ContextPrecision),
        ("context_recall", ContextRecall),
    ):
        assert isinstance(build_scorer(type_, {"model": "j"}, ctx), cls)


def test_cosine_is_never_nan() -> None:
    assert cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    assert cosine([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(-1.0)
