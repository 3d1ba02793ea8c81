"""Deterministic scorers: exact, contains, regex, json_valid, json_schema, numeric, levenshtein.

Each compares the output with the item's ``expected`` (or with values given in the suite) and
returns 1.0/0.0 with a pass/fail verdict, except ``levenshtein`` which returns a similarity.
Options are checked when the suite is loaded (:class:`ScorerConfigError`), never mid-run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext, ScoreResult, expected_text
from keel.plugins import hookimpl

__all__ = [
    "Contains",
    "ExactMatch",
    "JsonSchema",
    "JsonValid",
    "Levenshtein",
    "NumericTolerance",
    "RegexMatch",
    "extract_json",
    "register_scorers",
]

_MISSING = "missing_expected"
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WS = re.compile(r"\s+")


def _opts(options: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    unknown = set(options) - allowed
    if unknown:
        raise ScorerConfigError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}")
    return dict(options)


def _bool(options: Mapping[str, Any], key: str, default: bool, name: str) -> bool:
    v = options.get(key, default)
    if not isinstance(v, bool):
        raise ScorerConfigError(f"{name}.{key}: must be true or false")
    return v


class _Normaliser:
    def __init__(self, options: Mapping[str, Any], name: str) -> None:
        self.ignore_case = _bool(options, "ignore_case", False, name)
        self.strip = _bool(options, "strip", True, name)
        self.collapse = _bool(options, "normalise_whitespace", False, name)

    def __call__(self, text: str) -> str:
        if self.strip:
            text = text.strip()
        if self.collapse:
            text = _WS.sub(" ", text)
        if self.ignore_case:
            text = text.casefold()
        return text


_NORM_KEYS = {"ignore_case", "strip", "normalise_whitespace"}


class ExactMatch:
    """1 when the output equals the expected text (after optional strip/case/whitespace folding)."""

    name = "exact"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        self.norm = _Normaliser(_opts(options, "exact", _NORM_KEYS), "exact")

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if inp.expected is None:
            return ScoreResult.failed(_MISSING, "the item has no expected output")
        return ScoreResult.of(self.norm(inp.output) == self.norm(expected_text(inp)))


class Contains:
    """1 when the output contains the expected text (or ``value``: a string or a list, ``mode`` all|any)."""

    name = "contains"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        o = _opts(options, "contains", _NORM_KEYS | {"value", "mode"})
        self.norm = _Normaliser(o, "contains")
        value = o.get("value")
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            raise ScorerConfigError("contains.value: must be a string or a list of strings")
        self.values: list[str] | None = [value] if isinstance(value, str) else value
        self.mode = o.get("mode", "all")
        if self.mode not in ("all", "any"):
            raise ScorerConfigError("contains.mode: must be 'all' or 'any'")

    async def score(self, inp: ScoreInput) -> ScoreResult:
        needles = self.values
        if needles is None:
            if inp.expected is None:
                return ScoreResult.failed(_MISSING, "the item has no expected output")
            exp = inp.expected
            needles = (
                exp
                if isinstance(exp, list) and all(isinstance(x, str) for x in exp)
                else [expected_text(inp)]
            )
        hay = self.norm(inp.output)
        found = [self.norm(n) in hay for n in needles]
        ok = all(found) if self.mode == "all" else any(found)
        missing = [n for n, f in zip(needles, found, strict=True) if not f]
        return ScoreResult.of(ok, None if ok else f"missing: {', '.join(repr(m) for m in missing[:5])}")


class RegexMatch:
    """1 when ``pattern`` (default: the expected text as a pattern) matches the output."""

    name = "regex"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        o = _opts(options, "regex", {"pattern", "ignore_case", "full_match", "multiline"})
        flags = re.I if _bool(o, "ignore_case", False, "regex") else 0
        flags |= re.M if _bool(o, "multiline", False, "regex") else 0
        self.flags = flags
        self.full = _bool(o, "full_match", False, "regex")
        pattern = o.get("pattern")
        self.pattern: re.Pattern[str] | None = None
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ScorerConfigError("regex.pattern: must be a string")
            self.pattern = self._compile(pattern, ScorerConfigError)

    def _compile(self, pattern: str, exc: type[Exception]) -> re.Pattern[str]:
        try:
            return re.compile(pattern, self.flags)
        except re.error as err:
            raise exc(f"regex.pattern: invalid regular expression: {err}") from None

    async def score(self, inp: ScoreInput) -> ScoreResult:
        pattern = self.pattern
        if pattern is None:
            if inp.expected is None:
                return ScoreResult.failed(_MISSING, "no pattern option and no expected output")
            try:
                pattern = self._compile(expected_text(inp), ValueError)
            except ValueError as err:
                return ScoreResult.failed("invalid_pattern", str(err))
        m = pattern.fullmatch(inp.output.strip()) if self.full else pattern.search(inp.output)
        return ScoreResult.of(m is not None)


def extract_json(text: str) -> Any:
    """The JSON value in ``text``: the whole text, else a fenced ```json block; raises ValueError."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    m = _FENCE.search(text)
    if m:
        try:
            return orjson.loads(m.group(1))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"fenced block is not valid JSON: {exc}") from None
    raise ValueError("output is not valid JSON")


class JsonValid:
    """1 when the output is valid JSON (``fenced: true``, the default, also accepts a ```json block)."""

    name = "json_valid"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        o = _opts(options, "json_valid", {"fenced"})
        self.fenced = _bool(o, "fenced", True, "json_valid")

    async def score(self, inp: ScoreInput) -> ScoreResult:
        try:
            if self.fenced:
                extract_json(inp.output)
            else:
                orjson.loads(inp.output)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return ScoreResult.of(False, str(exc))
        return ScoreResult.of(True)


class JsonSchema:
    """1 when the output is JSON that validates against ``schema`` (JSON Schema, any draft)."""

    name = "json_schema"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        import jsonschema

        o = _opts(options, "json_schema", {"schema", "fenced"})
        schema = o.get("schema")
        if not isinstance(schema, dict):
            raise ScorerConfigError("json_schema.schema: required, a JSON Schema object")
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ScorerConfigError(f"json_schema.schema: invalid schema: {exc.message}") from None
        self.validator = cls(schema)
        self.fenced = _bool(o, "fenced", True, "json_schema")

    async def score(self, inp: ScoreInput) -> ScoreResult:
        try:
            value = extract_json(inp.output) if self.fenced else orjson.loads(inp.output)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return ScoreResult.of(False, str(exc))
        errors = sorted(self.validator.iter_errors(value), key=lambda e: list(e.path))
        if not errors:
            return ScoreResult.of(True)
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        return ScoreResult.of(False, f"{where}: {first.message}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _NUMBER.search(value)
        if m:
            try:
                return float(m.group(0).replace(",", ""))
            except ValueError:
                return None
    return None


class NumericTolerance:
    """1 when the first number in the output is within ``tolerance`` of the expected number.

    ``relative: true`` makes the tolerance a fraction of the expected value.
    """

    name = "numeric"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        o = _opts(options, "numeric", {"tolerance", "relative"})
        tol = o.get("tolerance", 0.0)
        if isinstance(tol, bool) or not isinstance(tol, int | float) or tol < 0 or not math.isfinite(tol):
            raise ScorerConfigError("numeric.tolerance: must be a number >= 0")
        self.tolerance = float(tol)
        self.relative = _bool(o, "relative", False, "numeric")

    async def score(self, inp: ScoreInput) -> ScoreResult:
        want = _number(inp.expected)
        if want is None:
            return ScoreResult.failed(_MISSING, "the item's expected output is not a number")
        got = _number(inp.output)
        if got is None:
            return ScoreResult.of(False, "no number in the output")
        allowed = self.tolerance * abs(want) if self.relative else self.tolerance
        diff = abs(got - want)
        return ScoreResult.of(diff <= allowed + 1e-12, f"got {got:g}, expected {want:g} (|diff| {diff:g})")


class Levenshtein:
    """Normalised edit similarity in [0, 1]: 1 - distance / max(len) (rapidfuzz)."""

    name = "levenshtein"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        from rapidfuzz.distance import Levenshtein as Lev

        self.norm = _Normaliser(_opts(options, "levenshtein", _NORM_KEYS), "levenshtein")
        self._sim: Callable[[str, str], float] = Lev.normalized_similarity

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if inp.expected is None:
            return ScoreResult.failed(_MISSING, "the item has no expected output")
        a, b = self.norm(inp.output), self.norm(expected_text(inp))
        return ScoreResult(value=1.0 if a == b else float(self._sim(a, b)))


@hookimpl
def register_scorers(register: Callable[[str, Any], None]) -> None:
    register("exact", ExactMatch)
    register("contains", Contains)
    register("regex", RegexMatch)
    register("json_valid", JsonValid)
    register("json_schema", JsonSchema)
    register("numeric", NumericTolerance)
    register("levenshtein", Levenshtein)
