"""Output rails: JSON and JSON-schema validation, banned words/topics/patterns, maximum length."""

from __future__ import annotations

import re
from typing import Any

import orjson

from keel.guardrails.base import TIER_REGEX, Finding, RailOptionError, option

__all__ = ["BannedRail", "JsonRail", "MaxLengthRail", "strip_fence"]

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(?P<body>[\s\S]*?)\n\s*```\s*$")


def strip_fence(text: str) -> str:
    """The JSON inside a markdown code fence, or the text as it is."""
    m = _FENCE.match(text)
    return m.group("body") if m else text


class JsonRail:
    """The answer must be JSON (an object or array), valid against ``schema`` when one is given.

    Options: ``schema`` (a JSON Schema), ``reask`` (how many times to ask the model again, with the
    validation error, before the action applies; non-streaming answers only; default 0).
    """

    tier = TIER_REGEX
    window = 0

    def __init__(self, options: dict[str, Any] | None = None, name: str = "json") -> None:
        options = options or {}
        self.name = name
        self.reask = option(options, "reask", int, 0)
        schema = option(options, "schema", dict, None)
        self._validator: Any = None
        if schema is not None:
            try:
                import jsonschema
            except ImportError:  # pragma: no cover - a main dependency
                raise RailOptionError("schema: the jsonschema package is not installed") from None
            cls = jsonschema.validators.validator_for(schema)
            try:
                cls.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise RailOptionError(f"schema: not a valid JSON Schema: {exc.message}") from None
            self._validator = cls(schema)

    def problem(self, text: str) -> str | None:
        """Why ``text`` fails (fit to show the model on a re-ask), or None when it passes."""
        try:
            value = orjson.loads(strip_fence(text))
        except orjson.JSONDecodeError as exc:
            return f"the answer is not valid JSON ({exc})"
        if self._validator is not None:
            err = next(iter(self._validator.iter_errors(value)), None)
            if err is not None:
                where = "/".join(str(p) for p in err.absolute_path) or "(root)"
                return f"the JSON does not match the schema at {where}: {err.message}"
        elif not isinstance(value, dict | list):
            return "the answer must be a JSON object or array"
        return None

    def scan(self, text: str) -> list[Finding]:
        why = self.problem(text)
        if why is None:
            return []
        kind = "invalid_json" if why.startswith("the answer") else "schema_violation"
        return [Finding(kind, detail=why[:200])]


class BannedRail:
    """Banned words and phrases (whole words, any case), regular expressions, and topics.

    Options: ``words`` (list), ``regex`` (list of patterns), ``topics`` ({name: [keywords]}),
    ``window`` (longest regex match, for stream hold-back; default 64).
    """

    tier = TIER_REGEX

    def __init__(self, options: dict[str, Any] | None = None, name: str = "banned") -> None:
        options = options or {}
        self.name = name
        words = option(options, "words", list, [])
        regexes = option(options, "regex", list, [])
        topics = option(options, "topics", dict, {})
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        if words:
            alt = "|".join(re.escape(str(w)) for w in sorted(words, key=len, reverse=True))
            self._patterns.append(("banned_word", re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)))
        for i, rx in enumerate(regexes):
            try:
                self._patterns.append(("banned_pattern", re.compile(str(rx))))
            except re.error as exc:
                raise RailOptionError(f"regex[{i}]: {exc}") from None
        for topic, keywords in topics.items():
            if not isinstance(keywords, list) or not keywords:
                raise RailOptionError(f"topics.{topic}: expected a non-empty list of keywords")
            alt = "|".join(re.escape(str(k)) for k in keywords)
            self._patterns.append((f"topic:{topic}", re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)))
        if not self._patterns:
            raise RailOptionError("give at least one of words, regex, topics")
        longest = max(
            [len(str(w)) for w in words] + [len(str(k)) for ks in topics.values() for k in ks] + [0]
        )
        self.window = max(longest, option(options, "window", int, 64 if regexes else 0))

    def scan(self, text: str) -> list[Finding]:
        return [Finding(kind, m.start(), m.end()) for kind, pat in self._patterns for m in pat.finditer(text)]


class MaxLengthRail:
    """An answer (or a request message) longer than ``chars`` characters or ``words`` words."""

    tier = TIER_REGEX
    window = 0
    incremental = True  # a stream is stopped as soon as it runs over, not at its end

    def __init__(self, options: dict[str, Any] | None = None, name: str = "max_length") -> None:
        options = options or {}
        self.name = name
        self.chars = option(options, "chars", int, None)
        self.words = option(options, "words", int, None)
        if self.chars is None and self.words is None:
            raise RailOptionError("give chars or words")

    def scan(self, text: str) -> list[Finding]:
        if self.chars is not None and len(text) > self.chars:
            return [Finding("too_long", detail=f"{len(text)} > {self.chars} characters")]
        if self.words is not None and len(text.split()) > self.words:
            return [Finding("too_long", detail=f"more than {self.words} words")]
        return []
