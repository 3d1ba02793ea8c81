"""Online evaluation: rules that score a sampled share of new production traces in the background.

A rule has a filter (model, tags, user, project, status), a sample rate and scorers (the same
specs as an eval suite's ``scorers:``), and optionally an annotation queue that sampled traces are
also put into.  The :class:`OnlineEvaluator` runs in the keel server process — never on the
gateway's request path: every ``interval_s`` it reads the LLM spans stored since each rule's
watermark, keeps those that match, samples them deterministically (a hash of rule id and trace id,
so replicas and re-runs agree), scores them and writes the results as ``eval`` scores on the trace
(``span_id`` set to the LLM call), where the trace page and the dashboards read them.

Replicas: a batch is claimed by moving the rule's watermark with a compare-and-set, so each span is
scored by one replica.  A span is only read once it is below the highest span id seen one tick
earlier, which leaves time for concurrently committing writers (PostgreSQL sequence order is not
commit order).  Judge calls carry the ``keel-judge`` tag and are never scored themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from keel.errors import KeelError, NotFound
from keel.evals.scorers.base import ScoreInput, Scorer, ScorerConfigError, ScorerContext, ScoreResult
from keel.evals.scorers.judge import JUDGE_TAG
from keel.store import Store, iso, utcnow
from keel.store.models import Span, Trace
from keel.store.models_review import OnlineRule
from keel.store.scores import add_score

__all__ = [
    "OnlineEvaluator",
    "RuleFilter",
    "RuleSpec",
    "build_rule_scorers",
    "create_rule",
    "delete_rule",
    "get_rule",
    "list_rules",
    "retrieved_contexts",
    "sampled",
    "span_io",
    "update_rule",
]

log = logging.getLogger("keel.evals.online")

RUNNER_KEYS = ("type", "name", "threshold", "gate")
# scorers that read the retrieved documents: a trace's retriever spans give them their contexts
CONTEXT_SCORERS = frozenset({"faithfulness", "context_precision", "context_recall"})
MAX_CONTEXTS = 20


class RuleFilter(BaseModel):
    """Which traces a rule looks at; every given field must match (tags: all of them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=200, description="Requested model name.")
    tags: list[str] | None = Field(default=None, max_length=20, description="Tags the trace must all carry.")
    user: str | None = Field(default=None, max_length=256, description="End user id.")
    project: str | None = Field(default=None, max_length=200, description="Project id or name.")
    status: str | None = Field(default=None, pattern=r"^(ok|error)$", description="`ok` or `error`.")


class RuleSpec(BaseModel):
    """An online rule as the API takes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    filter: RuleFilter = Field(default_factory=RuleFilter)
    sample_rate: float = Field(ge=0.0, le=1.0, description="Share of matching traces scored (0 to 1).")
    scorers: list[dict[str, Any]] = Field(
        default_factory=list, max_length=20, description="Scorer specs, as in a suite: `{type, name?, ...}`."
    )
    queue_id: str | None = Field(default=None, description="Also put sampled traces into this review queue.")
    enabled: bool = True

    @field_validator("scorers")
    @classmethod
    def _specs(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names: set[str] = set()
        for i, spec in enumerate(v):
            if not isinstance(spec.get("type"), str) or not spec["type"]:
                raise ValueError(f"scorers[{i}] needs a `type`")
            name = str(spec.get("name") or spec["type"])
            if name in names:
                raise ValueError(f"scorers[{i}]: two scorers named {name!r}; give one a `name`")
            names.add(name)
        return v


def sampled(rule_id: str, trace_id: str, rate: float) -> bool:
    """Whether a rule samples a trace: deterministic in (rule, trace), uniform over trace ids."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.sha256(f"{rule_id}:{trace_id}".encode()).digest()[:8], "big")
    return h / 2**64 < rate


class _Placeholder:
    """Stands in for the gateway client when scorer specs are only checked."""


async def _no_embed(texts: Sequence[str]) -> list[list[float]]:
    raise RuntimeError("no embedder")


def build_rule_scorers(specs: Sequence[Mapping[str, Any]], ctx: ScorerContext) -> list[Scorer]:
    """Scorers of a rule (raises ScorerConfigError naming the bad one)."""
    from keel.evals.scorers.registry import build_scorer

    out = []
    for i, spec in enumerate(specs):
        options = {k: v for k, v in spec.items() if k not in RUNNER_KEYS}
        try:
            out.append(build_scorer(str(spec["type"]), options, ctx, name=spec.get("name")))
        except ScorerConfigError as exc:
            raise ScorerConfigError(f"scorers[{i}]: {exc}") from None
    return out


def check_spec(spec: RuleSpec) -> None:
    """Reject scorers that cannot be built (400 with the reason)."""
    try:
        build_rule_scorers(spec.scorers, ScorerContext(http=_Placeholder(), embed=_no_embed))
    except ScorerConfigError as exc:
        raise KeelError(str(exc), status=400, code="invalid_scorer") from None


# -- rules: storage --------------------------------------------------------------------------------


def _rule_dict(r: OnlineRule) -> dict[str, Any]:
    return {
        "id": r.id,
        "project_id": r.project_id,
        "name": r.name,
        "enabled": r.enabled,
        "filter": r.filter or {},
        "sample_rate": r.sample_rate,
        "scorers": r.scorers or [],
        "queue_id": r.queue_id,
        "watermark": r.watermark,
        "matched": r.matched,
        "sampled": r.sampled,
        "scored": r.scored,
        "errors": r.errors,
        "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at),
    }


def _max_span_id(s: Session) -> int:
    return int(s.scalar(select(func.max(Span.id))) or 0)


def create_rule(store: Store, spec: RuleSpec, project_id: str | None = None) -> dict[str, Any]:
    """Store a rule; it looks at traces stored from now on."""
    check_spec(spec)
    now = utcnow()
    with Session(store.engine) as s, s.begin():
        rule = OnlineRule(
            id="rule_" + uuid.uuid4().hex[:20],
            project_id=project_id,
            name=spec.name,
            enabled=spec.enabled,
            filter=spec.filter.model_dump(exclude_none=True),
            sample_rate=spec.sample_rate,
            scorers=spec.scorers,
            queue_id=spec.queue_id,
            watermark=_max_span_id(s),
            matched=0,
            sampled=0,
            scored=0,
            errors=0,
            created_at=now,
            updated_at=now,
        )
        s.add(rule)
        s.flush()
        return _rule_dict(rule)


def list_rules(store: Store, project_id: str | None = None) -> list[dict[str, Any]]:
    with Session(store.engine) as s:
        stmt = select(OnlineRule).order_by(OnlineRule.created_at, OnlineRule.id)
        if project_id is not None:
            stmt = stmt.where(OnlineRule.project_id == project_id)
        return [_rule_dict(r) for r in s.scalars(stmt)]


def get_rule(store: Store, rule_id: str, project_id: str | None = None) -> dict[str, Any] | None:
    with Session(store.engine) as s:
        r = s.get(OnlineRule, rule_id)
        if r is None or (project_id is not None and r.project_id != project_id):
            return None
        return _rule_dict(r)


def update_rule(store: Store, rule_id: str, spec: RuleSpec, project_id: str | None = None) -> dict[str, Any]:
    """Replace a rule's definition (its watermark and counters stay)."""
    check_spec(spec)
    with Session(store.engine) as s, s.begin():
        r = s.get(OnlineRule, rule_id)
        if r is None or (project_id is not None and r.project_id != project_id):
            raise NotFound(f"rule {rule_id!r} not found", code="rule_not_found")
        r.name = spec.name
        r.enabled = spec.enabled
        r.filter = spec.filter.model_dump(exclude_none=True)
        r.sample_rate = spec.sample_rate
        r.scorers = spec.scorers
        r.queue_id = spec.queue_id
        r.updated_at = utcnow()
        s.flush()
        return _rule_dict(r)


def delete_rule(store: Store, rule_id: str, project_id: str | None = None) -> bool:
    with Session(store.engine) as s, s.begin():
        r = s.get(OnlineRule, rule_id)
        if r is None or (project_id is not None and r.project_id != project_id):
            return False
        s.delete(r)
        return True


# -- what a stored LLM span says --------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") in ("text", None)
        )
    return ""


def span_io(span_input: Any, span_output: Any) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(question, answer, prompt messages, tool calls) of an OpenAI or Anthropic LLM span."""
    messages: list[dict[str, Any]] = []
    if isinstance(span_input, Mapping):
        if isinstance(span_input.get("system"), str):
            messages.append({"role": "system", "content": span_input["system"]})
        for m in span_input.get("messages") or ():
            if isinstance(m, Mapping):
                messages.append({"role": str(m.get("role", "")), "content": _text(m.get("content"))})
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    answer = ""
    tool_calls: list[dict[str, Any]] = []
    out = span_output
    if isinstance(out, Mapping) and isinstance(out.get("choices"), list) and out["choices"]:
        out = out["choices"][0].get("message") or {}
    if isinstance(out, Mapping):
        content = out.get("content")
        answer = _text(content)
        for tc in out.get("tool_calls") or ():
            if isinstance(tc, Mapping):
                inner = tc.get("function")
                fn: Mapping[str, Any] = inner if isinstance(inner, Mapping) else tc
                tool_calls.append({"name": fn.get("name"), "arguments": fn.get("arguments")})
        if isinstance(content, list):  # Anthropic tool_use blocks
            for block in content:
                if isinstance(block, Mapping) and block.get("type") == "tool_use":
                    tool_calls.append({"name": block.get("name"), "arguments": block.get("input")})
    elif isinstance(out, str):
        answer = out
    return question, answer, messages, tool_calls


def retrieved_contexts(outputs: Sequence[Any]) -> list[str]:
    """Document texts from retriever span outputs: ``{"documents": [...]}`` (OTLP ingest) or a list,
    each document a string or an object with ``content``/``page_content``/``text``."""
    out: list[str] = []
    for output in outputs:
        docs = output.get("documents") if isinstance(output, Mapping) else output
        if isinstance(docs, str) or not isinstance(docs, Sequence):
            docs = [docs] if isinstance(docs, str) else []
        for d in docs:
            if isinstance(d, str):
                text = d
            elif isinstance(d, Mapping):
                text = next(
                    (d[k] for k in ("content", "page_content", "text") if isinstance(d.get(k), str)), ""
                )
            else:
                text = ""
            if text.strip():
                out.append(text)
            if len(out) >= MAX_CONTEXTS:
                return out
    return out


def _matches(flt: Mapping[str, Any], row: Any) -> bool:
    if flt.get("model") and flt["model"] not in (row.requested_model, row.model, row.trace_model):
        return False
    if flt.get("user") and flt["user"] not in (row.user_id, row.trace_user):
        return False
    if flt.get("status") and row.status != flt["status"]:
        return False
    tags = set(row.tags or ())
    if JUDGE_TAG in tags:
        return False
    return not (flt.get("tags") and not set(flt["tags"]) <= tags)


# -- the worker ---------------------------------------------------------------------------------------


class _BoundedCache(OrderedDict[str, Any]):
    """The judges' answer cache of a long-running worker: least recently set entries go first."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class OnlineStats:
    """Counters of one worker (exported in /metrics)."""

    ticks: int = 0
    spans_seen: int = 0
    sampled: int = 0
    scores_written: int = 0
    errors: int = 0  # scorer outcomes without a value (judge_error, ...) and scorer crashes
    failures: int = 0  # rule passes that failed as a whole (database errors, ...)
    per_rule: dict[str, int] = field(default_factory=dict)


class OnlineEvaluator:
    """Background scoring of new traces by the online rules (one per server process).

    ``http`` is an ``httpx.AsyncClient`` to the keel server itself (the judges' gateway), with a key;
    ``embed`` an optional embedder for scorers that need one.
    """

    def __init__(
        self,
        store: Store,
        http: Any,
        *,
        interval_s: float = 5.0,
        batch_size: int = 200,
        concurrency: int = 4,
        embed: Any = None,
    ) -> None:
        self.store = store
        self.http = http
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.concurrency = max(1, concurrency)
        self.ctx = ScorerContext(
            http=http, embed=embed, cache=_BoundedCache(10_000), concurrency=self.concurrency
        )
        self.stats = OnlineStats()
        self._horizon: int | None = None
        self._scorers: dict[str, tuple[str | None, list[Scorer]]] = {}

    async def run(self) -> None:
        """Tick forever (cancel to stop)."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.failures += 1
                log.exception("online evaluation pass failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> int:
        """One pass over every enabled rule; returns the number of scores written."""
        self.stats.ticks += 1
        horizon = self._horizon
        self._horizon = await asyncio.to_thread(self._max_span_id)
        if horizon is None:
            return 0
        rules = await asyncio.to_thread(self._enabled_rules)
        written = 0
        for rule in rules:
            try:
                written += await self._run_rule(rule, horizon)
            except Exception:
                self.stats.failures += 1
                log.exception("online rule %s failed", rule["id"])
        return written

    def _max_span_id(self) -> int:
        with Session(self.store.engine) as s:
            return _max_span_id(s)

    def _enabled_rules(self) -> list[dict[str, Any]]:
        with Session(self.store.engine) as s:
            return [_rule_dict(r) for r in s.scalars(select(OnlineRule).where(OnlineRule.enabled.is_(True)))]

    def _rule_scorers(self, rule: dict[str, Any]) -> list[Scorer]:
        cached = self._scorers.get(rule["id"])
        if cached is not None and cached[0] == rule["updated_at"]:
            return cached[1]
        scorers = build_rule_scorers(rule["scorers"], self.ctx)
        self._scorers[rule["id"]] = (rule["updated_at"], scorers)
        return scorers

    def _claim(self, rule: dict[str, Any], horizon: int) -> list[Any]:
        """Read the rule's next batch of LLM spans and move its watermark past them (compare-and-set)."""
        old = int(rule["watermark"])
        if old >= horizon:
            return []
        conds = [Span.id > old, Span.id <= horizon, Span.kind == "llm"]
        if rule["project_id"] is not None:
            conds.append(Span.project_id == rule["project_id"])
        project = (rule["filter"] or {}).get("project")
        stmt = (
            select(
                Span.id,
                Span.trace_id,
                Span.span_id,
                Span.project_id,
                Span.model,
                Span.requested_model,
                Span.user_id,
                Span.status,
                Span.input,
                Span.output,
                Trace.tags,
                Trace.model.label("trace_model"),
                Trace.user_id.label("trace_user"),
            )
            .join(Trace, Trace.trace_id == Span.trace_id)
            .where(and_(*conds))
            .order_by(Span.id)
            .limit(self.batch_size)
        )
        with Session(self.store.engine) as s, s.begin():
            rows = list(s.execute(stmt))
            new = rows[-1].id if len(rows) == self.batch_size else horizon
            claimed = s.execute(
                update(OnlineRule)
                .where(OnlineRule.id == rule["id"], OnlineRule.watermark == old)
                .values(watermark=new)
            ).rowcount  # type: ignore[attr-defined]
        if not claimed:  # another replica took this batch
            return []
        if project:
            pid = self.store.get_project(project)
            rows = [r for r in rows if pid is not None and r.project_id == pid["id"]]
        self.stats.spans_seen += len(rows)
        return rows

    async def _run_rule(self, rule: dict[str, Any], horizon: int) -> int:
        rows = await asyncio.to_thread(self._claim, rule, horizon)
        if not rows:
            return 0
        flt = rule["filter"] or {}
        matching = [r for r in rows if _matches(flt, r)]
        picked = [r for r in matching if sampled(rule["id"], r.trace_id, rule["sample_rate"])]
        self.stats.sampled += len(picked)
        if rule["queue_id"]:
            from keel.evals.review import add_item_once

            for r in picked:
                await asyncio.to_thread(add_item_once, self.store, rule["queue_id"], r.trace_id, rule["id"])
        scorers = self._rule_scorers(rule) if rule["scorers"] else []
        sem = asyncio.Semaphore(self.concurrency)

        async def one(row: Any) -> tuple[int, int]:
            async with sem:
                return await self._score_span(rule, scorers, row)

        outcomes = await asyncio.gather(*(one(r) for r in picked)) if scorers else []
        written = sum(w for w, _ in outcomes)
        errors = sum(e for _, e in outcomes)
        await asyncio.to_thread(self._count, rule["id"], len(matching), len(picked), written, errors)
        self.stats.scores_written += written
        self.stats.errors += errors
        self.stats.per_rule[rule["id"]] = self.stats.per_rule.get(rule["id"], 0) + written
        return written

    def _contexts(self, trace_id: str) -> list[str]:
        stmt = (
            select(Span.output)
            .where(Span.trace_id == trace_id, Span.kind == "retriever")
            .order_by(Span.start_time, Span.id)
        )
        with Session(self.store.engine) as s:
            return retrieved_contexts(list(s.scalars(stmt)))

    async def _score_span(self, rule: dict[str, Any], scorers: list[Scorer], row: Any) -> tuple[int, int]:
        question, answer, messages, tool_calls = span_io(row.input, row.output)
        wants_contexts = any(str(spec.get("type")) in CONTEXT_SCORERS for spec in rule["scorers"])
        contexts = await asyncio.to_thread(self._contexts, row.trace_id) if wants_contexts else []
        inp = ScoreInput(
            output=answer,
            input=question,
            contexts=contexts,
            prompt=messages,
            tool_calls=tool_calls,
            trace_id=row.trace_id,
            metadata={"model": row.requested_model or row.model, "rule": rule["id"]},
        )
        written = errors = 0
        for scorer in scorers:
            try:
                result: ScoreResult = await scorer.score(inp)
            except Exception as exc:
                log.warning("online rule %s: scorer %s raised %s", rule["id"], scorer.name, exc)
                errors += 1
                continue
            if result.value is None:
                errors += 1
                continue
            stored = await asyncio.to_thread(
                add_score,
                self.store,
                trace_id=row.trace_id,
                span_id=row.span_id,
                name=scorer.name,
                data_type="numeric",
                value=float(result.value),
                source="eval",
                comment=(result.explanation or None) and str(result.explanation)[:2000],
                author=f"online:{rule['id']}",
            )
            if stored is not None:
                written += 1
        return written, errors

    def _count(self, rule_id: str, matched: int, picked: int, written: int, errors: int) -> None:
        with Session(self.store.engine) as s, s.begin():
            s.execute(
                update(OnlineRule)
                .where(OnlineRule.id == rule_id)
                .values(
                    matched=OnlineRule.matched + matched,
                    sampled=OnlineRule.sampled + picked,
                    scored=OnlineRule.scored + written,
                    errors=OnlineRule.errors + errors,
                )
            )


def parse_spec(body: Any) -> RuleSpec:
    """A RuleSpec from JSON, or KeelError(400) naming the field."""
    try:
        return RuleSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise KeelError(f"{where}: {first.get('msg')}", status=400, code="invalid_request") from None
