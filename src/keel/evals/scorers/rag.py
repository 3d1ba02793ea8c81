"""RAG scorers with the RAGAS definitions (Es et al., 2023), a judge model doing the reading.

- ``faithfulness``: the judge splits the answer into standalone claims, then checks each against
  the retrieved contexts; value = supported claims / claims.
- ``answer_relevancy``: the judge writes ``n`` questions the answer would answer (and says whether
  the answer is noncommittal); value = mean cosine similarity between the item's question and
  those questions, 0 for a noncommittal answer.  Embeddings: ``embedding_model`` through the
  gateway's ``/v1/embeddings``, else the run's embedder, else the local MiniLM in-process.
- ``context_precision``: the judge marks each retrieved context useful or not for reaching the
  expected answer (the output when the item has none); value = mean over the useful positions k
  of precision@k, 0 when none is useful.
- ``context_recall``: the judge splits the expected answer into claims and checks whether each
  can be attributed to the contexts; value = attributable claims / claims.

Every judge answer is validated (see :mod:`keel.evals.scorers.judge`); a question that gets no
valid answer within the retries makes the item's outcome ``judge_error``.  An item that lacks what
a metric needs (no contexts, no expected answer, an answer without claims) gets an explicit error
code (``no_contexts``, ``no_reference``, ``no_claims``), never NaN.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from keel.evals.scorers.base import Embedder, ScoreInput, ScorerConfigError, ScorerContext, ScoreResult
from keel.evals.scorers.base import expected_text as _expected_text
from keel.evals.scorers.judge import (
    JUDGE_ERROR,
    JUDGE_TAG,
    JudgeClient,
    JudgeFailed,
    client_from_options,
    input_text,
)
from keel.plugins import hookimpl

__all__ = [
    "AnswerRelevancy",
    "ContextPrecision",
    "ContextRecall",
    "Faithfulness",
    "cosine",
    "gateway_embedder",
    "register_scorers",
]

MAX_CLAIMS = 50


class _Claims(BaseModel):
    model_config = ConfigDict(extra="ignore")

    claims: list[str] = Field(max_length=MAX_CLAIMS)


class _Verdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: str = ""
    verdict: bool


class _Questions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    questions: list[str] = Field(min_length=1, max_length=10)
    noncommittal: bool = False


SYSTEM = "You are a careful annotator for a retrieval-augmented generation evaluation. Reply in JSON only."


def _docs(contexts: Sequence[str]) -> str:
    return "\n\n".join(f"[{i}] {c}" for i, c in enumerate(contexts, 1))


def claims_prompt(question: str, text: str) -> list[dict[str, str]]:
    """Split an answer (or a reference) into standalone claims."""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": "Break the TEXT into short standalone factual claims (resolve pronouns; one fact "
            "each). A text with no factual content has no claims.\n\n"
            f"QUESTION: {question}\n\nTEXT: {text}\n\n"
            'Answer {"claims": ["...", ...]}.',
        },
    ]


def support_prompt(claim: str, contexts: Sequence[str]) -> list[dict[str, str]]:
    """Is the claim supported by (can it be inferred from / attributed to) the contexts?"""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": "Can the CLAIM be directly inferred from the CONTEXT? Use the context only, not "
            f"your own knowledge.\n\nCONTEXT:\n{_docs(contexts)}\n\nCLAIM: {claim}\n\n"
            'Answer {"reason": "<short>", "verdict": true|false}.',
        },
    ]


def usefulness_prompt(question: str, answer: str, context: str) -> list[dict[str, str]]:
    """Was this one context useful in arriving at the answer?"""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": "Was the CONTEXT useful in arriving at the ANSWER to the QUESTION?\n\n"
            f"QUESTION: {question}\n\nANSWER: {answer}\n\nCONTEXT: {context}\n\n"
            'Answer {"reason": "<short>", "verdict": true|false}.',
        },
    ]


def questions_prompt(answer: str, n: int) -> list[dict[str, str]]:
    """Questions the answer answers, and whether it is noncommittal ("I don't know", evasive)."""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Write {n} different questions that the ANSWER below answers. Also say whether "
            "the answer is noncommittal (evasive, vague or 'I don't know').\n\n"
            f"ANSWER: {answer}\n\n"
            'Answer {"questions": ["...", ...], "noncommittal": true|false}.',
        },
    ]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0.0 for a zero vector (never NaN)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / (na * nb)))


def gateway_embedder(http: Any, model: str) -> Embedder:
    """An :data:`Embedder` calling the gateway's /v1/embeddings with ``model``."""

    async def embed(texts: Sequence[str]) -> list[list[float]]:
        r = await http.post(
            "/v1/embeddings",
            content=orjson.dumps({"model": model, "input": list(texts)}),
            headers={"content-type": "application/json", "x-keel-tags": JUDGE_TAG},
        )
        if r.status_code != 200:
            raise RuntimeError(f"embeddings model {model} answered {r.status_code}: {r.text[:200]}")
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        return [list(map(float, d["embedding"])) for d in data]

    return embed


class _RagScorer:
    """Shared set-up: the judge client from the options; helpers to ask it in parallel."""

    name = "rag"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        opts = dict(options)
        self.setup(opts, ctx)
        self.client: JudgeClient = client_from_options(opts, ctx)
        if opts:
            raise ScorerConfigError(f"{self.name}: unknown option(s) {', '.join(sorted(opts))}")

    def setup(self, opts: dict[str, Any], ctx: ScorerContext) -> None:
        """Consume the scorer's own options (before the judge's)."""

    async def _verdicts(self, prompts: Sequence[list[dict[str, str]]]) -> tuple[list[bool], int]:
        """The judge's verdict on each prompt (in parallel, bounded by the client) and total requests."""
        outcomes = await asyncio.gather(
            *(self.client.ask(p, _Verdict) for p in prompts), return_exceptions=True
        )
        verdicts, requests = [], 0
        for o in outcomes:  # every question finishes before a failure is reported: no call left running
            if isinstance(o, BaseException):
                raise o
            verdicts.append(o[0].verdict)
            requests += o[1]
        return verdicts, requests

    def _error(self, exc: JudgeFailed) -> ScoreResult:
        return ScoreResult(
            value=None,
            error=JUDGE_ERROR,
            explanation=str(exc),
            details={"judge_model": self.client.model, "attempts": exc.attempts},
        )

    async def _run(self, body: Callable[[], Awaitable[ScoreResult]]) -> ScoreResult:
        try:
            return await body()
        except JudgeFailed as exc:
            return self._error(exc)


class Faithfulness(_RagScorer):
    """``type: faithfulness`` — supported claims of the output / claims of the output."""

    name = "faithfulness"

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if not inp.contexts:
            return ScoreResult.failed("no_contexts", "faithfulness needs the item's context documents")

        async def body() -> ScoreResult:
            claims, _ = await self.client.ask(claims_prompt(input_text(inp.input), inp.output), _Claims)
            items = [c.strip() for c in claims.claims if c.strip()]
            if not items:
                return ScoreResult.failed("no_claims", "the judge found no claims in the output")
            verdicts, _ = await self._verdicts([support_prompt(c, inp.contexts) for c in items])
            supported = sum(verdicts)
            return ScoreResult(
                value=supported / len(items),
                explanation=f"{supported} of {len(items)} claims supported by the contexts",
                details={
                    "claims": [{"claim": c, "supported": v} for c, v in zip(items, verdicts, strict=True)]
                },
            )

        return await self._run(body)


class ContextRecall(_RagScorer):
    """``type: context_recall`` — claims of the expected answer attributable to the contexts / claims."""

    name = "context_recall"

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if not inp.contexts:
            return ScoreResult.failed("no_contexts", "context_recall needs the item's context documents")
        reference = _expected_text(inp)
        if not reference.strip():
            return ScoreResult.failed("no_reference", "context_recall needs the item's expected answer")

        async def body() -> ScoreResult:
            claims, _ = await self.client.ask(claims_prompt(input_text(inp.input), reference), _Claims)
            items = [c.strip() for c in claims.claims if c.strip()]
            if not items:
                return ScoreResult.failed("no_claims", "the judge found no claims in the expected answer")
            verdicts, _ = await self._verdicts([support_prompt(c, inp.contexts) for c in items])
            found = sum(verdicts)
            return ScoreResult(
                value=found / len(items),
                explanation=f"{found} of {len(items)} reference claims attributable to the contexts",
                details={
                    "claims": [{"claim": c, "attributable": v} for c, v in zip(items, verdicts, strict=True)]
                },
            )

        return await self._run(body)


class ContextPrecision(_RagScorer):
    """``type: context_precision`` — mean precision@k over the positions k of useful contexts."""

    name = "context_precision"

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if not inp.contexts:
            return ScoreResult.failed("no_contexts", "context_precision needs the item's context documents")
        reference = _expected_text(inp) or inp.output
        question = input_text(inp.input)

        async def body() -> ScoreResult:
            useful, _ = await self._verdicts(
                [usefulness_prompt(question, reference, c) for c in inp.contexts]
            )
            value = average_precision(useful)
            return ScoreResult(
                value=value,
                explanation=f"{sum(useful)} of {len(useful)} contexts useful",
                details={"useful": useful},
            )

        return await self._run(body)


def average_precision(relevant: Sequence[bool]) -> float:
    """RAGAS context precision: sum over k of precision@k * v_k, divided by the number of relevant."""
    hits = 0
    total = 0.0
    for k, rel in enumerate(relevant, 1):
        if rel:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


class AnswerRelevancy(_RagScorer):
    """``type: answer_relevancy`` — mean cosine(question, questions generated from the output)."""

    name = "answer_relevancy"

    def setup(self, opts: dict[str, Any], ctx: ScorerContext) -> None:
        try:
            self.n = int(opts.pop("n", 3))
        except (TypeError, ValueError):
            raise ScorerConfigError("answer_relevancy: n must be an integer") from None
        if not 1 <= self.n <= 10:
            raise ScorerConfigError("answer_relevancy: n must be between 1 and 10")
        model = opts.pop("embedding_model", None)
        if model:
            if ctx.http is None:
                raise ScorerConfigError("answer_relevancy: embedding_model needs the gateway")
            self.embed: Embedder = gateway_embedder(ctx.http, str(model))
        elif ctx.embed is not None:
            self.embed = ctx.embed
        else:  # the local MiniLM in-process (a clear configuration error when it is not installed)
            from keel.evals.scorers.embedding import local_embedder

            self.embed = local_embedder()

    async def score(self, inp: ScoreInput) -> ScoreResult:
        question = input_text(inp.input)
        if not question.strip():
            return ScoreResult.failed("no_question", "answer_relevancy needs the item's input (the question)")

        async def body() -> ScoreResult:
            gen, _ = await self.client.ask(questions_prompt(inp.output, self.n), _Questions)
            questions = [q.strip() for q in gen.questions if q.strip()]
            if not questions:
                return ScoreResult.failed("no_claims", "the judge wrote no questions for the output")
            try:
                vectors = await self.embed([question, *questions])
            except Exception as exc:
                return ScoreResult.failed("embedding_error", f"{type(exc).__name__}: {exc}")
            sims = [cosine(vectors[0], v) for v in vectors[1:]]
            mean = sum(sims) / len(sims)
            value = 0.0 if gen.noncommittal else max(0.0, mean)
            return ScoreResult(
                value=value,
                explanation="noncommittal answer" if gen.noncommittal else f"mean similarity {mean:.3f}",
                details={"questions": questions, "similarities": sims, "noncommittal": gen.noncommittal},
            )

        return await self._run(body)


@hookimpl
def register_scorers(register: Any) -> None:
    register("faithfulness", Faithfulness)
    register("answer_relevancy", AnswerRelevancy)
    register("context_precision", ContextPrecision)
    register("context_recall", ContextRecall)
