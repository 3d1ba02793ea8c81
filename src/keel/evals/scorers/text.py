"""Reference-based text similarity: BLEU (sacrebleu) and ROUGE-L (rouge-score), both in [0, 1].

The expected output is the reference (a list of strings gives several references to BLEU; ROUGE-L
takes the best of them).  The libraries are imported when a suite uses the scorer, not before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext, ScoreResult, expected_text
from keel.plugins import hookimpl

__all__ = ["Bleu", "RougeL", "register_scorers"]


def _references(inp: ScoreInput) -> list[str]:
    exp = inp.expected
    if isinstance(exp, list) and exp and all(isinstance(x, str) for x in exp):
        return list(exp)
    return [expected_text(inp)]


class Bleu:
    """Sentence BLEU (sacrebleu, exponential smoothing), scaled to [0, 1]."""

    name = "bleu"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        unknown = set(options) - {"tokenize", "lowercase"}
        if unknown:
            raise ScorerConfigError(f"bleu: unknown option(s) {', '.join(sorted(unknown))}")
        import sacrebleu

        self._bleu = sacrebleu.metrics.BLEU(
            effective_order=True,
            tokenize=str(options.get("tokenize", "13a")),
            lowercase=bool(options.get("lowercase", False)),
        )

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if inp.expected is None:
            return ScoreResult.failed("missing_expected", "the item has no expected output")
        result = self._bleu.sentence_score(inp.output, _references(inp))
        return ScoreResult(value=min(1.0, max(0.0, result.score / 100.0)))


class RougeL:
    """ROUGE-L F-measure (rouge-score, Porter stemming); the best over several references."""

    name = "rouge_l"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        unknown = set(options) - {"stemmer"}
        if unknown:
            raise ScorerConfigError(f"rouge_l: unknown option(s) {', '.join(sorted(unknown))}")
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=bool(options.get("stemmer", True)))

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if inp.expected is None:
            return ScoreResult.failed("missing_expected", "the item has no expected output")
        best = max(self._scorer.score(ref, inp.output)["rougeL"].fmeasure for ref in _references(inp))
        return ScoreResult(value=float(best))


@hookimpl
def register_scorers(register: Callable[[str, Any], None]) -> None:
    register("bleu", Bleu)
    register("rouge_l", RougeL)
