"""The guardrail pipeline: policies chosen per project, key and model; rails run cheapest first;
actions applied to a request's messages, to an answer, and to a stream as it passes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from keel.config import GuardrailsConfig
from keel.errors import ConfigError
from keel.guardrails.base import Finding, GuardrailBlocked, RailOptionError
from keel.guardrails.pii import resolve_overlaps
from keel.guardrails.registry import RailContext, rail_factories
from keel.guardrails.vault import Vault
from keel.types import Principal

__all__ = ["Decision", "Guardrails", "RailSpec", "Session", "StreamGuard"]

_OUTCOME = {
    "allow": "allowed",
    "flag": "flagged",
    "mask": "masked",
    "block": "blocked",
    "pseudonymize": "pseudonymized",
}
_INJECTION_ROLES = frozenset({"user", "tool", "function"})


@dataclass(frozen=True)
class RailSpec:
    """A configured rail: the rail object, what to do with its findings, which roles it reads."""

    name: str
    kind: str
    action: str
    rail: Any
    roles: frozenset[str] | None = None

    @property
    def awaits(self) -> bool:
        return hasattr(self.rail, "ascan")

    @property
    def window(self) -> int:
        return int(getattr(self.rail, "window", 0))


@dataclass
class Decision:
    """What one rail decided in one stage of one request (a guardrail span)."""

    rail: str
    kind: str
    stage: str
    action: str
    start: float
    end: float = 0.0
    latency_s: float = 0.0
    findings: Counter[str] = field(default_factory=Counter)
    outcome: str = "pass"
    detail: str | None = None

    def add(self, spec: RailSpec, findings: list[Finding], elapsed: float) -> None:
        self.latency_s += elapsed
        self.end = time.time()
        for f in findings:
            self.findings[f.type] += 1
            if f.detail and self.detail is None:
                self.detail = f.detail
        if findings:
            self.outcome = _OUTCOME[spec.action]


class Policy:
    __slots__ = ("input", "keys", "models", "name", "output", "projects")

    def __init__(self, name: str, projects: list[str], keys: list[str], models: list[str]) -> None:
        self.name = name
        self.projects = frozenset(projects)
        self.keys = frozenset(keys)
        self.models = frozenset(models)
        self.input: list[RailSpec] = []
        self.output: list[RailSpec] = []

    def matches(self, p: Principal, model: str) -> bool:
        return (
            (not self.projects or p.project_id in self.projects)
            and (not self.keys or p.key_id in self.keys or (p.name in self.keys and not p.is_master))
            and (not self.models or model in self.models)
        )


def _tiered(specs: list[RailSpec]) -> tuple[RailSpec, ...]:
    return tuple(sorted(specs, key=lambda s: int(getattr(s.rail, "tier", 0))))  # stable: config order


class Guardrails:
    """The configured policies, built once (rail options are checked at start, not per request)."""

    def __init__(self, config: GuardrailsConfig, ctx: RailContext | None = None) -> None:
        ctx = ctx or RailContext()
        factories = rail_factories()
        self.policies: list[Policy] = []
        for i, pc in enumerate(config.policies):
            pol = Policy(pc.name, pc.projects, pc.keys, pc.models)
            for stage in ("input", "output"):
                for j, rc in enumerate(getattr(pc, stage)):
                    where = f"guardrails.policies[{i}].{stage}[{j}]"
                    factory = factories.get(rc.rail)
                    if factory is None:
                        raise ConfigError(
                            f"{where}.rail",
                            f"unknown rail {rc.rail!r} (known: {', '.join(sorted(factories))})",
                        )
                    if stage == "output" and rc.action == "pseudonymize":
                        raise ConfigError(f"{where}.action", "pseudonymize is an input action")
                    try:
                        rail = factory(dict(rc.options), ctx)
                    except RailOptionError as exc:
                        raise ConfigError(f"{where}.options", str(exc)) from None
                    roles = (
                        rc.roles
                        if rc.roles is not None
                        else (_INJECTION_ROLES if rc.rail == "injection" else None)
                    )
                    spec = RailSpec(
                        rc.name or rc.rail, rc.rail, rc.action, rail, frozenset(roles) if roles else None
                    )
                    getattr(pol, stage).append(spec)
            self.policies.append(pol)
        self._selected: dict[tuple[Any, ...], tuple[tuple[RailSpec, ...], tuple[RailSpec, ...]] | None] = {}

    def select(self, p: Principal, model: str) -> tuple[tuple[RailSpec, ...], tuple[RailSpec, ...]] | None:
        """The input and output rails that apply to ``p`` calling ``model`` (None: no rail applies)."""
        key = (p.project_id, p.key_id, p.name, p.is_master, model)
        try:
            return self._selected[key]
        except KeyError:
            pass
        inputs: list[RailSpec] = []
        outputs: list[RailSpec] = []
        for pol in self.policies:
            if pol.matches(p, model):
                inputs += pol.input
                outputs += pol.output
        chosen = (_tiered(inputs), _tiered(outputs)) if inputs or outputs else None
        if len(self._selected) > 10_000:  # keys and models come and go
            self._selected.clear()
        self._selected[key] = chosen
        return chosen


async def _scan(spec: RailSpec, text: str) -> list[Finding]:
    return list(await spec.rail.ascan(text)) if spec.awaits else list(spec.rail.scan(text))


#: ``reask(problem) -> completion body``: ask the model again, telling it what was wrong
Reask = Callable[[str], Awaitable[dict[str, Any]]]


class Session:
    """One request's pass through the rails: its vault, its decisions, and what was replaced."""

    def __init__(self, inputs: tuple[RailSpec, ...], outputs: tuple[RailSpec, ...]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.vault = Vault()
        self.decisions: dict[tuple[str, str], Decision] = {}
        self.masked: dict[str, str] = {}  # original -> replacement, to scrub the trace
        self.blocked: GuardrailBlocked | None = None
        self.reasks = 0

    # -- bookkeeping ------------------------------------------------------------------------------

    def decision(self, spec: RailSpec, stage: str) -> Decision:
        d = self.decisions.get((stage, spec.name))
        if d is None:
            d = self.decisions[(stage, spec.name)] = Decision(
                spec.name, spec.kind, stage, spec.action, time.time()
            )
        return d

    def block(self, spec: RailSpec, stage: str, findings: list[Finding], text: str) -> GuardrailBlocked:
        """The error for a block; what was found is masked in the trace all the same."""
        for f in findings:
            if f.spans_text:
                self.masked.setdefault(text[f.start : f.end], f"[{f.type.upper()}]")
        err = GuardrailBlocked(spec.name, stage, [f.type for f in findings])
        self.blocked = err
        return err

    @property
    def flagged(self) -> bool:
        return any(d.outcome == "flagged" for d in self.decisions.values())

    def scrub_pairs(self) -> list[tuple[str, str]]:
        """(original, replacement) of every value masked or pseudonymised, longest first."""
        pairs = dict(self.masked)
        pairs.update(self.vault.pairs())
        return sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    # -- applying an action to one text ------------------------------------------------------------

    def apply(self, spec: RailSpec, stage: str, text: str, findings: list[Finding]) -> str:
        """``text`` after ``spec``'s action on ``findings`` (raises GuardrailBlocked for block)."""
        if not findings or spec.action in ("allow", "flag"):
            return text
        if spec.action == "block":
            raise self.block(spec, stage, findings, text)
        whole = [f for f in findings if not f.spans_text]
        if whole:
            repl = f"[REDACTED: {whole[0].type}]"
            self.masked[text] = repl
            return repl
        out: list[str] = []
        pos = 0
        for f in resolve_overlaps(findings):
            assert f.start is not None and f.end is not None
            value = text[f.start : f.end]
            if spec.action == "pseudonymize" and stage == "input":
                repl = self.vault.token(f.type, value)
            else:
                repl = f"[{f.type.upper()}]"
                self.masked[value] = repl
            out += (text[pos : f.start], repl)
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    async def run(self, specs: tuple[RailSpec, ...], stage: str, text: str, role: str | None = None) -> str:
        """Every rail of ``specs`` over ``text`` in tier order; later rails see earlier rails' edits."""
        for spec in specs:
            if role is not None and spec.roles is not None and role not in spec.roles:
                continue
            t0 = time.perf_counter()
            found = await _scan(spec, text)
            self.decision(spec, stage).add(spec, found, time.perf_counter() - t0)
            text = self.apply(spec, stage, text, found)
        return text

    # -- stages ------------------------------------------------------------------------------------

    async def check_messages(self, messages: list[Any]) -> list[Any]:
        """The request's messages after the input rails (a new list; the originals are untouched)."""
        out: list[Any] = []
        for m in messages:
            if not isinstance(m, dict):
                out.append(m)
                continue
            role = m.get("role")
            content = m.get("content")
            if isinstance(content, str) and content:
                new = await self.run(self.inputs, "input", content, role)
                out.append(m if new == content else {**m, "content": new})
            elif isinstance(content, list):
                parts: list[Any] = []
                changed = False
                for part in content:
                    text = part.get("text") if isinstance(part, dict) else None
                    if isinstance(text, str) and text:
                        new = await self.run(self.inputs, "input", text, role)
                        if new != text:
                            part, changed = {**part, "text": new}, True
                    parts.append(part)
                out.append({**m, "content": parts} if changed else m)
            else:
                out.append(m)
        for spec in self.inputs:  # rails that had nothing to read still show in the trace
            self.decision(spec, "input")
        return out

    async def check_completion(self, body: dict[str, Any], reask: Reask | None = None) -> dict[str, Any]:
        """A completion body after the output rails, with pseudonyms restored (a new dict)."""
        if reask is not None:
            for _ in range(max((int(getattr(sp.rail, "reask", 0)) for sp in self.outputs), default=0)):
                problem = self._needs_reask(body)
                if problem is None:
                    break
                self.reasks += 1
                body = await reask(problem)
        choices = []
        for ch in body.get("choices") or []:
            msg = ch.get("message") if isinstance(ch, dict) else None
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(msg, dict) and isinstance(content, str):
                new = await self.run(self.outputs, "output", content)
                new = self.vault.restore(new)
                if new != content:
                    ch = {**ch, "message": {**msg, "content": new}}
            choices.append(ch)
        for spec in self.outputs:
            self.decision(spec, "output")
        return {**body, "choices": choices}

    def _needs_reask(self, body: dict[str, Any]) -> str | None:
        """What a JSON rail with ``reask`` finds wrong with the first choice, if anything."""
        choices = body.get("choices") or []
        msg = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, str):
            return None
        for spec in self.outputs:
            if getattr(spec.rail, "reask", 0) and hasattr(spec.rail, "problem"):
                problem: str | None = spec.rail.problem(content)
                if problem is not None:
                    return problem
        return None

    def stream(self) -> StreamGuard:
        return StreamGuard(self)


class StreamGuard:
    """Output rails over one streamed choice: holds back the longest match, redacts, then emits.

    Text before ``len(buffer) - window`` cannot become part of a match any more (no rail matches
    more than ``window`` characters), unless a match found now runs on to the end of the buffer:
    then everything from that match's start is held until it ends.
    """

    def __init__(self, session: Session) -> None:
        self.s = session
        specs = session.outputs
        self.spans = [sp for sp in specs if sp.window > 0 and not sp.awaits]
        self.whole = [sp for sp in specs if sp.window == 0 or sp.awaits]
        self.window = max((sp.window for sp in self.spans), default=0)
        self.buf = ""
        self.full: list[str] = []
        self.length = 0

    def feed(self, delta: str) -> str:
        """Text that is now safe to emit (possibly empty). Raises GuardrailBlocked."""
        self.buf += delta
        self.full.append(delta)
        self.length += len(delta)
        for spec in self.whole:
            if getattr(spec.rail, "incremental", False):  # e.g. max_length: no need to wait for the end
                t0 = time.perf_counter()
                found = spec.rail.scan("".join(self.full))
                self.s.decision(spec, "output").add(spec, found, time.perf_counter() - t0)
                if found and spec.action == "block":
                    raise self.s.block(spec, "output", found, "")
        return self._release(final=False)

    async def finish(self) -> str:
        """The rest of the text, and the whole-text rails over the complete answer."""
        tail = self._release(final=True)
        text = "".join(self.full)
        for spec in self.whole:
            if getattr(spec.rail, "incremental", False):
                continue
            t0 = time.perf_counter()
            found = await _scan(spec, text)
            self.s.decision(spec, "output").add(spec, found, time.perf_counter() - t0)
            if found and spec.action == "block":
                raise self.s.block(spec, "output", found, text)
        return tail

    def _release(self, final: bool) -> str:
        buf = self.buf
        cut = len(buf) if final else len(buf) - self.window
        if cut <= 0 and not final:
            return ""
        held: list[tuple[RailSpec, list[Finding], float]] = []
        for spec in self.spans:
            t0 = time.perf_counter()
            found = spec.rail.scan(buf)
            held.append((spec, found, time.perf_counter() - t0))
            for f in found:
                if f.spans_text and f.end >= len(buf) and not final:  # type: ignore[operator]
                    cut = min(cut, f.start)  # type: ignore[type-var]
                elif f.spans_text and f.start < cut < f.end:  # type: ignore[operator]
                    cut = f.start  # type: ignore[assignment]
        if self.s.vault and not final:
            cut = self.s.vault.pending_from(buf[:cut])
        if cut <= 0:
            return ""
        segment = buf[:cut]
        redact: list[Finding] = []
        for spec, found, elapsed in held:
            done = [f for f in found if f.end <= cut]  # type: ignore[operator]
            self.s.decision(spec, "output").add(spec, done, elapsed)
            if done and spec.action == "block":
                raise self.s.block(spec, "output", done, buf)
            if spec.action in ("mask", "pseudonymize"):
                redact += done
        if redact:
            out: list[str] = []
            pos = 0
            for f in resolve_overlaps(redact):
                assert f.start is not None and f.end is not None
                repl = f"[{f.type.upper()}]"
                self.s.masked[segment[f.start : f.end]] = repl
                out += (segment[pos : f.start], repl)
                pos = f.end
            out.append(segment[pos:])
            segment = "".join(out)
        self.buf = buf[cut:]
        return self.s.vault.restore(segment)
