"""Tool-call correctness: did the model call the expected tools with the expected arguments?

Expected calls come from the item's ``expected`` (a call ``{"name", "arguments"}``, a list of
them, or ``{"tool_calls": [...]}``; OpenAI's ``{"function": {"name", "arguments"}}`` shape works
too), or from the scorer's own ``expected`` option.  Arguments are compared as JSON values: a
JSON-encoded string is decoded first, object key order does not matter and ``1 == 1.0``.

Options: ``subset`` (the expected arguments may be a subset of the actual ones; default false),
``ignore_arguments`` (names only), ``ordered`` (calls must come in the expected order; default
false: each expected call is matched to a distinct actual call), ``allow_extra`` (extra calls do
not lower the score; default false).  ``value`` = matched expected calls / max(expected, actual)
(or / expected with ``allow_extra``); ``passed`` when every expected call matched and, unless
``allow_extra``, there were no others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext, ScoreResult
from keel.plugins import hookimpl

__all__ = ["ToolCallCorrectness", "normalise_calls", "normalise_json", "register_scorers"]


def normalise_json(value: Any) -> Any:
    """A JSON value in a canonical form: strings holding JSON decoded at the top, floats that are
    whole numbers as ints, tuples as lists (object key order is irrelevant to ``==`` already)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): normalise_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise_json(v) for v in value]
    return value


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            return normalise_json(orjson.loads(raw))
        except orjson.JSONDecodeError:
            return raw  # compared as the literal string
    return normalise_json({} if raw is None else raw)


def normalise_calls(raw: Any) -> list[dict[str, Any]]:
    """Tool calls in any common shape as ``[{"name": str, "arguments": <JSON value>}]``.

    Raises ValueError on something that is not a tool call."""
    if raw is None:
        return []
    if isinstance(raw, Mapping) and "tool_calls" in raw:
        raw = raw["tool_calls"]
    if isinstance(raw, Mapping):
        raw = [raw]
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise ValueError("tool calls must be an object or a list of objects with a name")
    out = []
    for call in raw:
        if not isinstance(call, Mapping):
            raise ValueError("each tool call must be an object")
        inner = call.get("function")
        fn: Mapping[str, Any] = inner if isinstance(inner, Mapping) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("each tool call needs a `name`")
        out.append({"name": name, "arguments": _arguments(fn.get("arguments", fn.get("input")))})
    return out


def _is_subset(expected: Any, actual: Any) -> bool:
    """Every key of expected (recursively for objects) is in actual with an equal value."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(k in actual and _is_subset(v, actual[k]) for k, v in expected.items())
    return bool(expected == actual)


class ToolCallCorrectness:
    """``type: tool_call`` — tool names and arguments against the expected calls."""

    name = "tool_call"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        opts = dict(options)
        self.subset = bool(opts.pop("subset", False))
        self.ignore_arguments = bool(opts.pop("ignore_arguments", False))
        self.ordered = bool(opts.pop("ordered", False))
        self.allow_extra = bool(opts.pop("allow_extra", False))
        self.fixed: list[dict[str, Any]] | None = None
        if "expected" in opts:
            try:
                self.fixed = normalise_calls(opts.pop("expected"))
            except ValueError as exc:
                raise ScorerConfigError(f"tool_call: expected: {exc}") from None
        if opts:
            raise ScorerConfigError(f"tool_call: unknown option(s) {', '.join(sorted(opts))}")

    def _match(self, exp: dict[str, Any], act: dict[str, Any]) -> str | None:
        """None when ``act`` satisfies ``exp``, else why not."""
        if exp["name"] != act["name"]:
            return f"called {act['name']} instead of {exp['name']}"
        if self.ignore_arguments:
            return None
        ok = (
            _is_subset(exp["arguments"], act["arguments"])
            if self.subset
            else exp["arguments"] == act["arguments"]
        )
        if not ok:
            return f"{exp['name']}: arguments {orjson.dumps(act['arguments']).decode()[:200]} do not match"
        return None

    async def score(self, inp: ScoreInput) -> ScoreResult:
        try:
            expected = self.fixed if self.fixed is not None else normalise_calls(inp.expected)
        except ValueError as exc:
            return ScoreResult.failed("bad_expected", f"the item's expected tool calls: {exc}")
        try:
            actual = normalise_calls(list(inp.tool_calls))
        except ValueError as exc:
            return ScoreResult(value=0.0, passed=False, explanation=f"unreadable tool calls: {exc}")
        problems: list[str] = []
        matched = 0
        if self.ordered:
            for i, exp in enumerate(expected):
                if i >= len(actual):
                    problems.append(f"missing call {exp['name']}")
                    continue
                why = self._match(exp, actual[i])
                if why is None:
                    matched += 1
                else:
                    problems.append(why)
        else:
            free = list(range(len(actual)))
            for exp in expected:
                hit = next((j for j in free if self._match(exp, actual[j]) is None), None)
                if hit is None:
                    same_name = [actual[j] for j in free if actual[j]["name"] == exp["name"]]
                    problems.append(
                        self._match(exp, same_name[0]) or "" if same_name else f"missing call {exp['name']}"
                    )
                else:
                    free.remove(hit)
                    matched += 1
        extra = max(0, len(actual) - matched) if not self.ordered else max(0, len(actual) - len(expected))
        if extra and not self.allow_extra:
            problems.append(f"{extra} unexpected call(s)")
        denominator = len(expected) if self.allow_extra else max(len(expected), len(actual))
        value = 1.0 if denominator == 0 else matched / denominator
        passed = matched == len(expected) and (self.allow_extra or extra == 0)
        return ScoreResult(
            value=value,
            passed=passed,
            explanation="; ".join(p for p in problems if p) or None,
            details={"expected": len(expected), "actual": len(actual), "matched": matched},
        )


@hookimpl
def register_scorers(register: Any) -> None:
    register("tool_call", ToolCallCorrectness)
