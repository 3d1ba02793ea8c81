"""The scorer protocol: every scorer (built-in or third-party) is a plugin behind it.

A scorer turns one model output (plus the dataset item it answers) into a :class:`ScoreResult`.

Writing one::

    from keel.evals.scorers.base import ScoreInput, ScoreResult, ScorerContext
    from keel.plugins import hookimpl

    class StartsWith:
        name = "starts_with"

        def __init__(self, options, ctx):
            self.prefix = str(options.get("prefix", ""))

        async def score(self, inp: ScoreInput) -> ScoreResult:
            return ScoreResult.of(inp.output.startswith(self.prefix))

    @hookimpl
    def register_scorers(register):
        register("starts_with", StartsWith)   # factory(options: dict, ctx: ScorerContext) -> Scorer

A suite names it like a built-in (``scorers: [{type: starts_with, prefix: "Hi"}]``), or points at
the callable directly without a plugin (``{type: "my_pkg.scorers:StartsWith"}``).

Rules every scorer keeps:

- ``value`` is a float in [0, 1] (1 = best) or None; never NaN.  None means the scorer could not
  score the item, and then ``error`` says why (e.g. ``"judge_error"``); errors are counted, not
  averaged in.
- ``passed`` is the scorer's own verdict when it has one (threshold, exact match); else None and
  the runner derives it from ``value >= threshold`` when the suite sets a threshold.
- ``score`` is async so model-based scorers (judges, RAG) can call the gateway through
  ``ctx.http``; purely computational scorers just return.  It must not raise for bad model
  output (return a result with ``error``); it may raise :class:`ScorerConfigError` from the
  factory for a bad suite configuration.
- ``cost_usd`` is the cost of any model calls the scorer itself made (judges), so a run's total
  cost includes scoring.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Embedder",
    "ScoreInput",
    "ScoreResult",
    "Scorer",
    "ScorerConfigError",
    "ScorerContext",
    "ScorerFactory",
    "expected_text",
]


class ScorerConfigError(ValueError):
    """A scorer's options in a suite are invalid (unknown type, bad regex, bad schema, ...)."""


@dataclass(frozen=True, slots=True)
class ScoreInput:
    """What a scorer sees for one (item, output) pair.

    ``input`` is the dataset item's input (a string or a dict of template variables);
    ``expected`` the item's expected output (any JSON value, often a string) or None;
    ``contexts`` the item's context documents (RAG); ``metadata`` the item's metadata;
    ``output`` the model's text output; ``tool_calls`` the OpenAI-shape tool calls the model
    made (``[{"name", "arguments": dict}]``, arguments already JSON-decoded where possible);
    ``prompt`` the rendered prompt (chat messages) that produced the output.
    """

    output: str
    input: Any = None
    expected: Any = None
    contexts: Sequence[str] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    tool_calls: Sequence[Mapping[str, Any]] = ()
    prompt: Sequence[Mapping[str, Any]] = ()
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """One scorer's verdict on one output. ``value`` in [0, 1] or None (then ``error`` is set)."""

    value: float | None
    passed: bool | None = None
    label: str | None = None
    explanation: str | None = None
    error: str | None = None
    cost_usd: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.value is not None and (isinstance(self.value, bool) or not math.isfinite(self.value)):
            raise ValueError(f"score value must be a finite float, got {self.value!r}")
        if self.value is None and not self.error:
            raise ValueError("a score without a value must say why in `error`")

    @classmethod
    def of(cls, ok: bool, explanation: str | None = None) -> ScoreResult:
        """A pass/fail result: 1.0 and passed, or 0.0 and failed."""
        return cls(value=1.0 if ok else 0.0, passed=ok, explanation=explanation)

    @classmethod
    def failed(cls, error: str, explanation: str | None = None, cost_usd: float = 0.0) -> ScoreResult:
        """The scorer could not score this item (``error`` is a short code such as ``judge_error``)."""
        return cls(value=None, error=error, explanation=explanation, cost_usd=cost_usd)


Embedder = Callable[[Sequence[str]], Awaitable[list[list[float]]]]
"""Turns texts into L2-normalised vectors (local MiniLM in-process, or the gateway's /v1/embeddings)."""


@dataclass(slots=True)
class ScorerContext:
    """Collaborators a scorer factory may use; all optional so deterministic scorers need none.

    ``http`` is an ``httpx.AsyncClient`` whose base URL is the keel gateway and which already
    carries the bearer key, so a judge posts ``/v1/chat/completions`` and every call is traced and
    costed.  ``embed`` embeds texts.  ``cache`` is a dict-like store shared by a run (judges key
    it by judge model + prompt).
    """

    http: Any = None
    embed: Embedder | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 4


@runtime_checkable
class Scorer(Protocol):
    """Scores one output. ``name`` is what results are reported under (unique within a suite)."""

    name: str

    async def score(self, inp: ScoreInput) -> ScoreResult: ...


ScorerFactory = Callable[[Mapping[str, Any], ScorerContext], Scorer]
"""``factory(options, ctx)`` -> Scorer; ``options`` is the suite's mapping for this scorer minus
``type`` (and minus the runner's own keys ``name``, ``threshold``, ``gate``)."""


def expected_text(inp: ScoreInput) -> str:
    """The expected output as text (non-strings JSON-encoded), or "" when there is none."""
    if inp.expected is None:
        return ""
    if isinstance(inp.expected, str):
        return inp.expected
    import orjson

    return orjson.dumps(inp.expected, option=orjson.OPT_SORT_KEYS).decode()
