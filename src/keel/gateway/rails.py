"""Guardrails in the gateway: input rails before the cache and the provider, output rails on the
answer (whole or streamed), and one guardrail span per rail decision.

The hot path pays nothing when no guardrail is configured (``Gateway.rails`` is None) and one dict
lookup per request when no policy matches its project, key and model.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from keel.config import Settings
from keel.errors import KeelError
from keel.guardrails import GuardrailBlocked, Guardrails, RailContext, Session, StreamGuard
from keel.providers.base import SSEParser
from keel.tracing import new_span_id
from keel.types import ChatResult, SpanRecord

__all__ = ["GatewayRails", "GuardedResponder", "build_rails"]

_REASK = (
    "Your previous answer was rejected: {problem}. Answer again with only the corrected JSON, "
    "no commentary and no code fence."
)


def build_rails(settings: Settings, gateway: Any) -> GatewayRails | None:
    """The gateway's guardrails, or None when none are configured (the hot path then skips them)."""
    cfg = settings.guardrails
    if not cfg.enabled or not cfg.policies:
        return None
    return GatewayRails(Guardrails(cfg, RailContext(complete=_judge_caller(gateway))), gateway)


def _judge_caller(gateway: Any) -> Any:
    async def complete(model: str, messages: list[dict[str, Any]]) -> str:
        """Ask a configured model (an LLM judge); a failing judge counts as 'no verdict'."""
        name = gateway.router.resolve(model) or model
        deps = gateway.models.by_name.get(name) or []
        if not deps:
            return ""
        body = {"model": model, "messages": messages, "max_tokens": 5, "temperature": 0}
        try:
            result = await deps[0].provider.chat(body, {})
        except KeelError:
            return ""
        choices = result.body.get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        return content if isinstance(content, str) else ""

    return complete


class GatewayRails:
    """Selects a request's rails, runs the input stage and wraps the responder for the output stage."""

    def __init__(self, guardrails: Guardrails, gateway: Any) -> None:
        self.guardrails = guardrails
        self.gateway = gateway

    async def begin(
        self, req: Any, body: dict[str, Any], out: Any, target: str, run: Any
    ) -> tuple[dict[str, Any], Any]:
        """Run the input rails (raises GuardrailBlocked); return the body to send and the responder."""
        chosen = self.guardrails.select(req.principal, body["model"])
        if chosen is None:
            return body, out
        session = Session(*chosen)
        req.guard = RequestGuard(session, req)
        if session.inputs:
            msgs = body.get("messages") or []
            new = await session.check_messages(msgs)
            if any(a is not b for a, b in zip(new, msgs, strict=True)):
                body = {**body, "messages": new}
            if session.flagged:
                out.add_header(b"x-keel-guardrails", b"flagged")
        if not session.outputs and not session.vault:
            return body, out

        async def reask(problem: str) -> dict[str, Any]:
            retry = {
                **body,
                "messages": [
                    *body["messages"],
                    {"role": "assistant", "content": last[0]},
                    {"role": "user", "content": _REASK.format(problem=problem)},
                ],
            }
            result = await self.gateway._attempt_all(retry, target, run, stream=False)
            last[0] = _content(result.body)
            return dict(result.body)

        last = [""]
        return body, GuardedResponder(out, session, reask, last)


def _content(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    c = (choices[0].get("message") or {}).get("content") if isinstance(choices[0], dict) else None
    return c if isinstance(c, str) else ""


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class GuardedResponder:
    """A Responder that puts the answer through the output rails (and restores pseudonyms) first.

    Streams are read as OpenAI SSE: each choice's content deltas go through a :class:`StreamGuard`
    that holds back as much text as the longest rail can match, so a value split across chunks is
    redacted before any of it leaves. A block mid-stream ends the stream with an error event.
    """

    def __init__(self, inner: Any, session: Session, reask: Any, last: list[str]) -> None:
        self.inner = inner
        self.s = session
        self._reask = reask
        self._last = last
        self._parser = SSEParser()
        self._guards: dict[int, StreamGuard] = {}
        self._template: dict[str, Any] = {}
        self._stopped = False

    def add_header(self, name: bytes, value: bytes) -> None:
        self.inner.add_header(name, value)

    async def complete(self, result: ChatResult) -> None:
        self._last[0] = _content(result.body)
        try:
            body = await self.s.check_completion(result.body, self._reask)
        except GuardrailBlocked as err:
            await self.inner.error(err)
            return
        if self.s.flagged:
            self.inner.add_header(b"x-keel-guardrails", b"flagged")
        same = body == result.body
        await self.inner.complete(
            ChatResult(
                body=body,
                usage=result.usage,
                served_model=result.served_model,
                raw=result.raw if same else None,
            )
        )

    async def error(self, err: KeelError) -> None:
        await self.inner.error(err)

    async def stream_start(self) -> None:
        await self.inner.stream_start()

    async def stream_chunk(self, chunk: bytes) -> None:
        if self._stopped:
            return
        out: list[bytes] = []
        try:
            for raw in self._parser.feed(chunk):
                out += await self._event(raw)
        except GuardrailBlocked as err:
            self._stopped = True
            if out:
                await self.inner.stream_chunk(b"".join(out))
            await self.inner.stream_error(err)
            return
        if out:
            await self.inner.stream_chunk(b"".join(out))

    async def _event(self, raw: bytes) -> list[bytes]:
        _, payload = SSEParser.fields(raw)
        if payload == b"[DONE]":
            return [*await self._flush(), raw + b"\n\n"]
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return [raw + b"\n\n"]
        choices = event.get("choices") if isinstance(event, dict) else None
        if not isinstance(choices, list) or not choices:
            return [raw + b"\n\n"]
        if not self._template:
            self._template = {k: v for k, v in event.items() if k in ("id", "object", "created", "model")}
        before: list[bytes] = []
        changed = False
        for ch in choices:
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0)
            delta = ch.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                guard = self._guards.get(idx)
                if guard is None:
                    guard = self._guards[idx] = self.s.stream()
                released = guard.feed(content)
                if released != content:
                    delta["content"] = released  # type: ignore[index]
                    changed = True
            if ch.get("finish_reason") is not None and idx in self._guards:
                tail = await self._guards.pop(idx).finish()
                if tail:  # the held-back text goes out before the choice finishes
                    before.append(self._content_event(idx, tail))
        return [*before, _sse(event) if changed else raw + b"\n\n"]

    def _content_event(self, idx: int, text: str) -> bytes:
        return _sse(
            {
                **self._template,
                "choices": [{"index": idx, "delta": {"content": text}, "finish_reason": None}],
            }
        )

    async def _flush(self) -> list[bytes]:
        events = []
        for idx in sorted(self._guards):
            tail = await self._guards[idx].finish()
            if tail:
                events.append(self._content_event(idx, tail))
        self._guards.clear()
        return events

    async def stream_error(self, err: KeelError) -> None:
        if self._stopped:
            return
        try:
            tail = await self._flush()  # what was held back is safe to show before the error
        except GuardrailBlocked:
            tail = []
        if tail:
            await self.inner.stream_chunk(b"".join(tail))
        await self.inner.stream_error(err)

    async def stream_end(self) -> None:
        if not self._stopped and self._guards:
            try:
                tail = await self._flush()
            except GuardrailBlocked as err:
                self._stopped = True
                await self.inner.stream_error(err)
                tail = []
            if tail:
                await self.inner.stream_chunk(b"".join(tail))
        await self.inner.stream_end()


class RequestGuard:
    """What the gateway keeps of one request's guardrails until its span is written."""

    __slots__ = ("req", "session")

    def __init__(self, session: Session, req: Any) -> None:
        self.session = session
        self.req = req

    def finish(self, rec: SpanRecord) -> list[SpanRecord]:
        """Scrub masked values from the span, note the decisions on it, and return the guardrail spans."""
        s = self.session
        pairs = s.scrub_pairs()
        if pairs:
            rec.input = _scrub(rec.input, pairs)
            rec.output = _scrub(rec.output, pairs)
        if s.blocked is not None and s.blocked.stage == "output" and rec.status == "ok":
            err = s.blocked
            rec.status, rec.status_code, rec.error = "error", err.status, f"{err.code}: {err.message}"
        rec.attributes["keel.guardrails"] = [
            {"rail": d.rail, "stage": d.stage, "action": d.action, "outcome": d.outcome}
            for d in s.decisions.values()
        ]
        if s.reasks:
            rec.attributes["keel.guardrails.reasks"] = s.reasks
        spans = []
        for d in s.decisions.values():
            start = d.start
            end = max(d.end, start + d.latency_s)
            attrs: dict[str, Any] = {
                "keel.guardrail.rail": d.rail,
                "keel.guardrail.type": d.kind,
                "keel.guardrail.stage": d.stage,
                "keel.guardrail.action": d.action,
                "keel.guardrail.outcome": d.outcome,
                "keel.guardrail.findings": dict(d.findings),  # types and counts, never the values
                "keel.guardrail.latency_ms": round(d.latency_s * 1000.0, 3),
            }
            if d.detail:
                attrs["keel.guardrail.detail"] = d.detail
            blocked = d.outcome == "blocked"
            spans.append(
                SpanRecord(
                    trace_id=rec.trace_id,
                    span_id=new_span_id(),
                    parent_span_id=rec.span_id,
                    name=f"guardrail {d.stage}: {d.rail}",
                    kind="guardrail",
                    start_time=start,
                    end_time=end if end > start else time.time(),
                    status="error" if blocked else "ok",
                    status_code=400 if blocked else 200,
                    error=f"guardrail_blocked: {d.rail}" if blocked else None,
                    project_id=rec.project_id,
                    key_id=rec.key_id,
                    team_id=rec.team_id,
                    requested_model=rec.requested_model,
                    attributes=attrs,
                )
            )
        return spans


def _scrub(value: Any, pairs: list[tuple[str, str]]) -> Any:
    """``value`` (JSON-like) with every original replaced by its mask or placeholder."""
    if isinstance(value, str):
        for orig, repl in pairs:
            if orig in value:
                value = value.replace(orig, repl)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, pairs) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, pairs) for v in value]
    return value
