"""LLM-as-judge: a G-Eval-style rubric scorer, and the judge client the RAG scorers share.

The judge is a model called through the keel gateway (OpenAI chat-completions shape), so every
judge call is authenticated, limited, traced and costed like any other.  Its answer must be JSON
that validates against a pydantic model; a malformed answer is sent back to the judge with the
validation error, at most ``max_retries`` more times, and then the item's outcome is an explicit
``judge_error`` (a :class:`ScoreResult` with ``value=None``), never NaN.  Attempts, retries and
errors are counted on :class:`JudgeStats`.  Valid answers are cached by judge model, parameters and
the full prompt, so a changed rubric or a different judge never reuses a stale verdict.

G-Eval (Liu et al., 2023): the rubric's criteria plus explicit evaluation steps (given, or written
once by the judge itself with ``steps: auto``), then a form-filling answer on an integer scale.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext, ScoreResult, expected_text
from keel.plugins import hookimpl

__all__ = [
    "JUDGE_ERROR",
    "JUDGE_TAG",
    "JudgeClient",
    "JudgeFailed",
    "JudgeStats",
    "JudgeVerdict",
    "RubricJudge",
    "client_from_options",
    "input_text",
    "parse_json_reply",
    "register_scorers",
]

JUDGE_ERROR = "judge_error"
JUDGE_TAG = "keel-judge"
"""Tag on every judge call's trace; online evaluation never scores traces that carry it."""

DEFAULT_MAX_RETRIES = 2
MAX_FIELD_CHARS = 20_000  # each of input/output/expected/context in a judge prompt

M = TypeVar("M", bound=BaseModel)


class JudgeFailed(Exception):
    """The judge gave no valid answer within the retries (or could not be reached)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass
class JudgeStats:
    """Counters of one judge client (shared by every scorer built on it)."""

    calls: int = 0  # judge requests sent
    retries: int = 0  # requests beyond the first of a question
    malformed: int = 0  # answers that were not valid JSON for the schema
    errors: int = 0  # questions that ended in judge_error
    cache_hits: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "retries": self.retries,
            "malformed": self.malformed,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
        }


_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*|\s*```$")


def parse_json_reply(text: str, schema: type[M]) -> M:
    """The judge's reply as ``schema``: plain JSON, JSON in a code fence, or the first {...} in prose.

    Raises ValueError saying what is wrong (for the retry message)."""
    raw = _FENCE.sub("", text.strip())
    candidates = [raw]
    start, end = raw.find("{"), raw.rfind("}")
    if 0 <= start < end and (start, end) != (0, len(raw) - 1):
        candidates.append(raw[start : end + 1])
    last: str = "the reply is not a JSON object"
    for c in candidates:
        try:
            data = orjson.loads(c)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            last = "the reply must be a JSON object"
            continue
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "object"
            last = f"{where}: {first.get('msg', 'invalid')}"
    raise ValueError(last)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " …[truncated]"


def input_text(value: Any) -> str:
    """A dataset item's input as text: a string as is; a mapping's question/query/input field, else JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("question", "query", "input", "prompt"):
            if isinstance(value.get(key), str):
                return str(value[key])
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class JudgeClient:
    """Asks a judge model questions whose answers must validate against a pydantic model.

    ``http`` is an ``httpx.AsyncClient`` whose base URL is the keel server (with the bearer key).
    """

    def __init__(
        self,
        http: Any,
        model: str,
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        temperature: float = 0.0,
        max_tokens: int | None = 512,
        json_mode: bool = False,
        cache: dict[str, Any] | None = None,
        concurrency: int = 4,
        stats: JudgeStats | None = None,
    ) -> None:
        if http is None:
            raise ScorerConfigError("a judge needs the gateway (no HTTP client in the scorer context)")
        if not model:
            raise ScorerConfigError("a judge needs `model`: the gateway model name of the judge")
        if max_retries < 0 or max_retries > 10:
            raise ScorerConfigError("max_retries must be between 0 and 10")
        self.http = http
        self.model = model
        self.max_retries = max_retries
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        self.cache = cache if cache is not None else {}
        self.stats = stats or JudgeStats()
        self._sem = asyncio.Semaphore(max(1, concurrency))

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens:
            params["max_tokens"] = self.max_tokens
        if self.json_mode:
            params["response_format"] = {"type": "json_object"}
        return params

    def cache_key(self, messages: Sequence[Mapping[str, Any]], schema: type[BaseModel]) -> str:
        """Judge model, parameters, answer schema and the whole prompt: any change is a new key."""
        blob = orjson.dumps(
            [self.model, self._params(), schema.__name__, list(messages)], option=orjson.OPT_SORT_KEYS
        )
        return "judge:" + hashlib.sha256(blob).hexdigest()

    async def _complete(self, messages: list[dict[str, Any]]) -> str:
        body = {"model": self.model, "messages": messages, **self._params()}
        async with self._sem:
            self.stats.calls += 1
            r = await self.http.post(
                "/v1/chat/completions",
                content=orjson.dumps(body),
                headers={"content-type": "application/json", "x-keel-tags": JUDGE_TAG},
            )
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:200]
            raise _Unreachable(f"judge model {self.model} answered {r.status_code}: {msg}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Unreachable("the gateway's answer had no message content") from None
        return content if isinstance(content, str) else ""

    async def ask(self, messages: Sequence[Mapping[str, Any]], schema: type[M]) -> tuple[M, int]:
        """The judge's valid answer and the number of requests it took (0 from the cache).

        Raises :class:`JudgeFailed` after ``1 + max_retries`` requests without a valid answer."""
        key = self.cache_key(messages, schema)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return schema.model_validate(hit), 0
        convo = [dict(m) for m in messages]
        problem = "no answer"
        for attempt in range(1, self.max_retries + 2):
            if attempt > 1:
                self.stats.retries += 1
            try:
                text = await self._complete(convo)
            except _Unreachable as exc:
                problem = str(exc)
                continue
            except Exception as exc:  # connection errors, timeouts
                problem = f"judge call failed: {type(exc).__name__}: {exc}"
                continue
            try:
                answer = parse_json_reply(text, schema)
            except ValueError as exc:
                self.stats.malformed += 1
                problem = f"malformed judge answer ({exc})"
                convo = [
                    *convo[: len(messages)],
                    {"role": "assistant", "content": text[:4000]},
                    {
                        "role": "user",
                        "content": f"That answer was invalid: {exc}. Reply again with only the JSON object "
                        "described above, nothing else.",
                    },
                ]
                continue
            self.cache[key] = answer.model_dump(mode="json")
            return answer, attempt
        self.stats.errors += 1
        raise JudgeFailed(problem, self.max_retries + 1)


class _Unreachable(Exception):
    """The gateway refused the judge call or answered something that is not a chat completion."""


# -- the rubric judge ------------------------------------------------------------------------------


class JudgeVerdict(BaseModel):
    """What the rubric judge must answer."""

    model_config = ConfigDict(extra="ignore")

    reasoning: str = Field(default="", max_length=20_000)
    score: int


class _Steps(BaseModel):
    model_config = ConfigDict(extra="ignore")

    steps: list[str] = Field(min_length=1, max_length=12)


def _scale(value: Any) -> tuple[int, int]:
    if value is None:
        return 1, 5
    m = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", value) if isinstance(value, str) else None
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        try:
            lo, hi = int(value[0]), int(value[1])
        except (TypeError, ValueError):
            raise ScorerConfigError("scale must be two integers, e.g. [1, 5]") from None
    else:
        raise ScorerConfigError("scale must be two integers, e.g. [1, 5] or '1-5'")
    if not hi > lo:
        raise ScorerConfigError("scale: the maximum must be above the minimum")
    return lo, hi


def _steps(value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        return [s.strip() for s in value.strip().splitlines() if s.strip()]
    if isinstance(value, Sequence) and all(isinstance(s, str) for s in value):
        return [str(s) for s in value]
    raise ScorerConfigError("steps must be a list of strings, a multi-line string or 'auto'")


class RubricJudge:
    """``type: judge`` — a model grades the output against a rubric on an integer scale.

    Options: ``model`` (gateway model name, required), ``rubric`` (the criteria, required),
    ``scale`` ([1, 5] by default), ``steps`` (evaluation steps, or ``auto``), ``include``
    (which of input/expected/contexts the judge sees; default: all that the item has),
    ``max_retries`` (2), ``temperature`` (0), ``max_tokens`` (512), ``json_mode`` (send
    ``response_format: json_object``; off by default since not every model supports it).
    ``value`` is the score normalised to [0, 1]; ``label`` the raw integer score.
    """

    name = "judge"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        opts = dict(options)
        self.rubric = str(opts.pop("rubric", "") or "").strip()
        if not self.rubric:
            raise ScorerConfigError("judge: `rubric` is required (the criteria the judge applies)")
        self.lo, self.hi = _scale(opts.pop("scale", None))
        self.steps = _steps(opts.pop("steps", None))
        include = opts.pop("include", None)
        self.include = set(include) if include is not None else {"input", "expected", "contexts"}
        if not self.include <= {"input", "expected", "contexts"}:
            raise ScorerConfigError("judge: include may name input, expected and contexts")
        self.client = client_from_options(opts, ctx)
        if opts:
            raise ScorerConfigError(f"judge: unknown option(s) {', '.join(sorted(opts))}")
        self._auto_steps: list[str] | None = None
        self._steps_lock = asyncio.Lock()
        self._verdict = create_model(
            f"JudgeVerdict_{self.lo}_{self.hi}",
            __base__=JudgeVerdict,
            score=(int, Field(ge=self.lo, le=self.hi)),
        )

    @property
    def stats(self) -> JudgeStats:
        return self.client.stats

    async def _evaluation_steps(self) -> list[str]:
        if self.steps is None:
            return [
                "Read the input (and the expected answer and context documents, when given).",
                "Read the output and check it against each of the criteria.",
                f"Decide on a score from {self.lo} (worst) to {self.hi} (best).",
            ]
        if self.steps != "auto":
            return list(self.steps)
        async with self._steps_lock:  # G-Eval's auto chain-of-thought: written once per judge and rubric
            if self._auto_steps is None:
                messages = [
                    {"role": "system", "content": "You design evaluation procedures. Answer in JSON."},
                    {
                        "role": "user",
                        "content": f"Evaluation criteria:\n{self.rubric}\n\nWrite 3 to 6 concise evaluation "
                        'steps a grader follows to apply these criteria. Answer {"steps": ["...", ...]}.',
                    },
                ]
                answer, _ = await self.client.ask(messages, _Steps)
                self._auto_steps = answer.steps
            return self._auto_steps

    def messages(self, inp: ScoreInput, steps: Sequence[str]) -> list[dict[str, str]]:
        """The judge prompt for one output (public so users can see exactly what is asked)."""
        parts = [f"Evaluation criteria:\n{self.rubric}", "Evaluation steps:"]
        parts.append("\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1)))
        if "input" in self.include and inp.input is not None:
            parts.append(f"Input:\n{_clip(input_text(inp.input))}")
        if "contexts" in self.include and inp.contexts:
            docs = "\n\n".join(f"[{i}] {_clip(c)}" for i, c in enumerate(inp.contexts, 1))
            parts.append(f"Context documents:\n{docs}")
        if "expected" in self.include and inp.expected is not None:
            parts.append(f"Expected output:\n{_clip(expected_text(inp))}")
        parts.append(f"Output to evaluate:\n{_clip(inp.output)}")
        parts.append(
            "Answer with a JSON object only: "
            f'{{"reasoning": "<one or two sentences>", "score": <integer from {self.lo} to {self.hi}>}}'
        )
        system = (
            "You are a strict, fair evaluator. Follow the evaluation steps, then grade the output. "
            "Reply in JSON."
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]

    async def score(self, inp: ScoreInput) -> ScoreResult:
        lo, hi = self.lo, self.hi
        try:
            steps = await self._evaluation_steps()
            verdict, attempts = await self.client.ask(self.messages(inp, steps), self._verdict)
        except JudgeFailed as exc:
            return ScoreResult(
                value=None,
                error=JUDGE_ERROR,
                explanation=str(exc),
                details={"judge_model": self.client.model, "attempts": exc.attempts},
            )
        return ScoreResult(
            value=(verdict.score - lo) / (hi - lo),
            label=str(verdict.score),
            explanation=verdict.reasoning or None,
            details={"judge_model": self.client.model, "raw_score": verdict.score, "attempts": attempts},
        )


def client_from_options(opts: dict[str, Any], ctx: ScorerContext) -> JudgeClient:
    """A JudgeClient from a scorer's options (consumes its keys from ``opts``)."""
    model = str(opts.pop("model", "") or "")
    try:
        max_retries = int(opts.pop("max_retries", DEFAULT_MAX_RETRIES))
        temperature = float(opts.pop("temperature", 0.0))
        raw_max = opts.pop("max_tokens", 512)
        max_tokens = int(raw_max) if raw_max is not None else None
    except (TypeError, ValueError):
        raise ScorerConfigError("max_retries, temperature and max_tokens must be numbers") from None
    json_mode = bool(opts.pop("json_mode", False))
    return JudgeClient(
        ctx.http,
        model,
        max_retries=max_retries,
        temperature=temperature,
        max_tokens=max_tokens,
        json_mode=json_mode,
        cache=ctx.cache,
        concurrency=ctx.concurrency,
    )


@hookimpl
def register_scorers(register: Any) -> None:
    register("judge", RubricJudge)
