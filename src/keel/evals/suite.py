"""The suite file (YAML): prompts x models x a dataset x scorers, and how to run them.

::

    name: capitals
    dataset: {name: capitals, file: capitals.jsonl}   # or just a stored dataset's name
    prompts:
      - name: terse
        messages:
          - {role: system, content: "Answer with the city name only."}
          - {role: user, content: "What is the capital of {{ country }}?"}
      - prompt: capital-answer@production             # a registry prompt (name@label or name@3)
    models: [local]                                    # gateway model names, or {name, params, alias}
    params: {temperature: 0, max_tokens: 16}
    scorers:
      - {type: contains, ignore_case: true}
      - {type: embedding, threshold: 0.8}
    concurrency: 4        # model calls in flight at once
    retries: 2            # per call, on 429 / 5xx / connection errors
    repeats: 1            # outputs per item and variant (non-determinism)
    cache: true           # reuse outputs keyed by model, params and rendered prompt
    gate: {threshold: -0.05, confidence: 0.95}

Loading checks everything a run would trip over later and raises :class:`SuiteError` with every
problem, each prefixed by where it is (``prompts[1].messages: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "RUNNER_SCORER_KEYS",
    "DatasetSpec",
    "GateSpec",
    "ModelSpec",
    "PromptSpec",
    "ScorerSpec",
    "Suite",
    "SuiteError",
    "load_suite",
    "parse_suite",
]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.\-/]{1,200})(?:@(?P<ref>[A-Za-z0-9_.\-]{1,64}))?$")
RUNNER_SCORER_KEYS = ("type", "name", "threshold", "gate")


class SuiteError(ValueError):
    """A suite that cannot run; the message lists every problem with where it is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptSpec(_Strict):
    """One prompt: inline ``messages`` (chat) or ``template`` (text), or a registry ``prompt`` ref."""

    name: str | None = None
    prompt: str | None = Field(default=None, description="Registry prompt: name, name@label or name@version.")
    messages: list[dict[str, Any]] | None = None
    template: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        given = [k for k in ("prompt", "messages", "template") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'prompt' (registry ref), 'messages' or 'template'")
        if self.prompt is not None and not _REF.match(self.prompt):
            raise ValueError(f"'prompt' must look like name, name@label or name@3; got {self.prompt!r}")
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError("'name' may hold letters, digits, '_', '.', '-' (1-100 characters)")
        return self

    @property
    def ref(self) -> tuple[str, str]:
        """(prompt name, version or label) of a registry prompt; the label defaults to production."""
        m = _REF.match(self.prompt or "")
        assert m is not None
        return m["name"], m["ref"] or "production"


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=200, description="A model name the gateway serves.")
    params: dict[str, Any] = Field(default_factory=dict)
    alias: str | None = Field(default=None, description="How the variant is named (default: name).")


class ScorerSpec(BaseModel):
    """``type`` plus the scorer's own options; ``threshold`` makes a pass/fail, ``gate`` the allowed change."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str = Field(min_length=1)
    name: str | None = None
    threshold: float | None = Field(default=None, description="value >= threshold counts as a pass.")
    gate: float | None = Field(
        default=None,
        description="Fail the gate when the CI lower bound of (run - baseline) is below this (default: gate.threshold).",
    )

    @property
    def key(self) -> str:
        return self.name or self.type

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetSpec(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    file: str | None = Field(default=None, description="JSONL, CSV or YAML, relative to the suite file.")
    version: int | None = Field(default=None, ge=0, description="Pin a stored dataset version.")

    @model_validator(mode="after")
    def _something(self) -> DatasetSpec:
        if self.name is None and self.file is None:
            raise ValueError("a dataset needs 'name' (stored) or 'file' (local), or both")
        if self.file is not None and self.version is not None:
            raise ValueError("'version' pins a stored dataset; it cannot be combined with 'file'")
        return self


class GateSpec(_Strict):
    threshold: float = Field(
        default=-0.05, description="Default: fail when a scorer's CI lower bound of the change is below this."
    )
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    resamples: int = Field(default=2000, ge=100, le=100_000)
    seed: int = 0


class Suite(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    dataset: DatasetSpec
    prompts: list[PromptSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    scorers: list[ScorerSpec] = Field(min_length=1)
    concurrency: int = Field(default=8, ge=1, le=512)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0, le=60)
    repeats: int = Field(default=1, ge=1, le=100)
    timeout_s: float = Field(default=120.0, gt=0)
    cache: bool = True
    gate: GateSpec = Field(default_factory=GateSpec)
    tags: list[str] = Field(default_factory=list)

    base_dir: str | None = Field(default=None, exclude=True, description="Where relative files are found.")

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorers(cls, v: Any) -> Any:
        return [{"type": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        keys = [s.key for s in self.scorers]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"scorer names must be unique; give 'name' to tell apart: {', '.join(dup)}")
        names = self.variant_names()
        dupv = sorted({n for n in names if names.count(n) > 1})
        if dupv:
            raise ValueError(
                f"two variants share a name ({', '.join(dupv)}): give the prompts distinct names"
            )
        return self

    def prompt_names(self) -> list[str]:
        out = []
        for i, p in enumerate(self.prompts):
            out.append(p.name or (p.ref[0].rsplit("/", 1)[-1] if p.prompt else f"prompt{i + 1}"))
        return out

    def variant_names(self) -> list[str]:
        """One variant per prompt x model: ``<prompt>/<model>``."""
        return [f"{p}/{m.alias or m.name}" for p in self.prompt_names() for m in self.models]

    def resolve(self, file: str) -> Path:
        path = Path(file)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path


def _describe(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        where = ""
        for part in e.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)


def parse_suite(doc: Any, base_dir: str | Path | None = None) -> Suite:
    """Validate a suite mapping (as read from YAML)."""
    if not isinstance(doc, dict):
        raise SuiteError("a suite must be a mapping with name, dataset, prompts, models and scorers")
    try:
        suite = Suite.model_validate({**doc, "base_dir": str(base_dir) if base_dir is not None else None})
    except ValidationError as exc:
        raise SuiteError(_describe(exc)) from None
    return suite


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; a missing dataset file is reported here, not mid-run."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SuiteError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{p}: invalid YAML: {exc}") from None
    if isinstance(doc, dict):
        doc.setdefault("name", p.stem)
    try:
        suite = parse_suite(doc, p.parent)
    except SuiteError as exc:
        raise SuiteError(f"{p}:\n{exc}") from None
    if suite.dataset.file is not None and not suite.resolve(suite.dataset.file).is_file():
        raise SuiteError(f"{p}: dataset.file: {suite.resolve(suite.dataset.file)} does not exist")
    return suite
