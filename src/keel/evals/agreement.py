"""Judge quality: how well does an LLM judge agree with human labels on a dataset?

Each dataset item carries the output to grade and a human label: the output is
``metadata.<output_field>`` (default ``output``) or else the item's ``expected``; the label is
``metadata.<label_field>`` (a dotted path, default ``label``; items sent from a review queue carry
``review.<score name>``).  The judge (a rubric judge, :mod:`keel.evals.scorers.judge`) grades each
output; its raw integer score is compared with the label — as categories, or both made pass/fail by
``threshold`` (score >= threshold passes; a yes/no label is taken as is).  Reported: accuracy
(observed agreement), Cohen's kappa (agreement beyond chance), the confusion matrix, and how many
items were left out (no label, or ``judge_error``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.evals.scorers.base import ScoreInput, ScorerContext
from keel.evals.scorers.judge import RubricJudge

__all__ = ["AgreementReport", "cohen_kappa", "judge_agreement", "label_of", "measure"]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e).

    When chance agreement is total (both raters always give the one same label) kappa is
    undefined; it is reported as 1.0 (they agree perfectly) rather than NaN."""
    if len(a) != len(b):
        raise ValueError("both raters must label the same items")
    n = len(a)
    if n == 0:
        raise ValueError("no items to compare")
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if p_e >= 1.0:
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


@dataclass
class AgreementReport:
    n: int  # items compared
    accuracy: float
    kappa: float
    labels: list[str]
    confusion: dict[str, dict[str, int]]  # human label -> judge label -> count
    unlabelled: int = 0
    judge_errors: int = 0
    judge_stats: dict[str, int] = field(default_factory=dict)
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "kappa": self.kappa,
            "labels": self.labels,
            "confusion": self.confusion,
            "unlabelled": self.unlabelled,
            "judge_errors": self.judge_errors,
            "judge_stats": self.judge_stats,
            "disagreements": self.disagreements,
        }


def _dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    return data


def label_of(value: Any, threshold: float | None) -> str | None:
    """A label as a category string: booleans/yes-no as pass|fail, numbers as integers (or pass|fail
    against ``threshold``), other strings as they are; None when there is no label."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("yes", "y", "true", "pass", "good"):
            return "pass"
        if low in ("no", "n", "false", "fail", "bad"):
            return "fail"
        try:
            value = float(low)
        except ValueError:
            return value.strip()
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, int | float):
        if threshold is not None:
            return "pass" if value >= threshold else "fail"
        return str(int(value)) if float(value).is_integer() else str(value)
    return str(value)


def measure(pairs: Sequence[tuple[str, str]]) -> tuple[float, float, list[str], dict[str, dict[str, int]]]:
    """(accuracy, kappa, labels, confusion) of (human, judge) label pairs."""
    human = [h for h, _ in pairs]
    judge = [j for _, j in pairs]
    accuracy = sum(h == j for h, j in pairs) / len(pairs)
    kappa = cohen_kappa(human, judge)
    labels = sorted(set(human) | set(judge))
    confusion = {h: {j: 0 for j in labels} for h in labels}
    for h, j in pairs:
        confusion[h][j] += 1
    return accuracy, kappa, labels, confusion


async def judge_agreement(
    items: Sequence[Mapping[str, Any]],
    http: Any,
    judge_options: Mapping[str, Any],
    *,
    label_field: str = "label",
    output_field: str = "output",
    threshold: float | None = None,
    concurrency: int = 4,
    progress: Any = None,
) -> AgreementReport:
    """Grade every labelled item with the judge and compare with the human labels."""
    ctx = ScorerContext(http=http, concurrency=concurrency)
    judge = RubricJudge(dict(judge_options), ctx)
    labelled: list[tuple[Mapping[str, Any], str]] = []
    unlabelled = 0
    for item in items:
        human = label_of(_dig(item.get("metadata") or {}, label_field), threshold)
        if human is None:
            unlabelled += 1
        else:
            labelled.append((item, human))
    if not labelled:
        raise ValueError(f"no item has a human label at metadata.{label_field}")
    sem = asyncio.Semaphore(max(1, concurrency))

    async def grade(item: Mapping[str, Any]) -> Any:
        meta = item.get("metadata") or {}
        output = _dig(meta, output_field)
        if output is None:
            output = item.get("expected")
        inp = ScoreInput(
            output=output if isinstance(output, str) else "" if output is None else str(output),
            input=item.get("input"),
            contexts=list(item.get("contexts") or ()),
        )
        async with sem:
            res = await judge.score(inp)
        if progress is not None:
            progress()
        return res

    results = await asyncio.gather(*(grade(i) for i, _ in labelled))
    pairs: list[tuple[str, str]] = []
    disagreements: list[dict[str, Any]] = []
    errors = 0
    for (item, human), res in zip(labelled, results, strict=True):
        if res.value is None:
            errors += 1
            continue
        raw = int(res.details["raw_score"])
        got = label_of(raw, threshold)
        assert got is not None
        pairs.append((human, got))
        if got != human and len(disagreements) < 50:
            disagreements.append(
                {"id": item.get("id"), "human": human, "judge": got, "reasoning": res.explanation}
            )
    if not pairs:
        raise ValueError("the judge gave no valid verdict (every item ended in judge_error)")
    accuracy, kappa, labels, confusion = measure(pairs)
    return AgreementReport(
        n=len(pairs),
        accuracy=accuracy,
        kappa=kappa,
        labels=labels,
        confusion=confusion,
        unlabelled=unlabelled,
        judge_errors=errors,
        judge_stats=judge.stats.as_dict(),
        disagreements=disagreements,
    )
