"""Paired bootstrap confidence intervals for the change of a score between two runs.

Each item contributes one difference ``head - base`` (its mean over repeats in each run); the
interval is the percentile interval of the mean difference over ``resamples`` resamplings of the
items with replacement.  A fixed seed makes a gate's verdict reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDelta", "paired_bootstrap"]

_CHUNK = 2_000_000  # resample indices drawn at once (bounded memory for large datasets)


@dataclass(frozen=True, slots=True)
class PairedDelta:
    """Mean of the head and base scores over paired items, their difference and its CI."""

    n: int
    base_mean: float
    head_mean: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    p_worse: float  # share of resamples whose mean difference is below zero

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "base_mean": self.base_mean,
            "head_mean": self.head_mean,
            "delta": self.delta,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "p_worse": self.p_worse,
        }


def paired_bootstrap(
    base: Sequence[float],
    head: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDelta:
    """The paired bootstrap CI of mean(head - base); ``base[i]`` and ``head[i]`` are the same item."""
    if len(base) != len(head):
        raise ValueError("paired samples must have the same length")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    n = len(base)
    if n == 0:
        raise ValueError("no paired items to compare")
    b = np.asarray(base, dtype=np.float64)
    h = np.asarray(head, dtype=np.float64)
    d = h - b
    delta = float(d.mean())
    if n == 1 or float(d.min()) == float(d.max()):
        # every resample has the same mean: the interval is the point itself
        return PairedDelta(
            n, float(b.mean()), float(h.mean()), delta, delta, delta, confidence, float(delta < 0)
        )
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    per = max(1, _CHUNK // n)
    for start in range(0, resamples, per):
        k = min(per, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start : start + k] = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return PairedDelta(
        n=n,
        base_mean=float(b.mean()),
        head_mean=float(h.mean()),
        delta=delta,
        ci_low=float(lo),
        ci_high=float(hi),
        confidence=confidence,
        p_worse=float((means < 0).mean()),
    )
