"""Eval scorers: one protocol (``base``), built-ins and plugins found through one registry."""

from keel.evals.scorers.base import (
    ScoreInput,
    Scorer,
    ScorerConfigError,
    ScorerContext,
    ScoreResult,
    ScorerFactory,
)

__all__ = [
    "ScoreInput",
    "ScoreResult",
    "Scorer",
    "ScorerConfigError",
    "ScorerContext",
    "ScorerFactory",
]
