"""``@observe`` and ``span()``: spans around functions and blocks, with kind, input and output.

Attribute names are OpenInference's (``openinference.span.kind``, ``input.value``, ...), which keel's
OTLP ingest maps onto its span model.  Nothing here raises into the application: SDK failures
are counted and logged; the application's own exceptions are recorded and re-raised unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from contextvars import Token
from types import TracebackType
from typing import Any, TypeVar, overload

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from keel.sdk import _context, _runtime
from keel.sdk._export import warn_once
from keel.sdk._payload import bind_arguments, encode, signature_of, usage_of

__all__ = ["KINDS", "SpanHandle", "SpanScope", "current_span", "observe", "span"]

KINDS = ("LLM", "CHAIN", "TOOL", "RETRIEVER", "EMBEDDING", "AGENT", "RERANKER", "GUARDRAIL", "EVALUATOR")
ATTR_KIND = "openinference.span.kind"
_MAX_ITEMS = 1000  # items of a generator kept as its output

F = TypeVar("F", bound=Callable[..., Any])
_UNSET: Any = object()


def _kind(kind: str) -> str:
    k = str(kind).upper()
    if k in KINDS:
        return k
    warn_once("kind:" + k, "keel sdk: unknown span kind %r, using CHAIN (known: %s)", kind, ", ".join(KINDS))
    return "CHAIN"


def _limit() -> int:
    rt = _runtime.active()
    return rt.config.max_io_chars if rt is not None else 32_000


def _attribute_value(value: Any) -> Any:
    """A value OpenTelemetry accepts: primitives and lists of one primitive type; else JSON text."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = list(value)
        kinds = {type(v) for v in items}
        if len(kinds) <= 1 and kinds <= {str, bool, int, float}:
            return items
    return encode(value, _limit())[0]


class SpanHandle:
    """The current span, to add what the decorator cannot see (output, model, token usage, ...)."""

    __slots__ = ("_span",)

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    @property
    def trace_id(self) -> str | None:
        """The trace id as 32 hex digits (what keel's /api/traces/{id} takes), None outside a span."""
        ctx = self._span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    @property
    def span_id(self) -> str | None:
        ctx = self._span.get_span_context()
        return f"{ctx.span_id:016x}" if ctx.is_valid else None

    def _io(self, which: str, value: Any) -> None:
        text, mime = encode(value, _limit())
        self._span.set_attribute(f"{which}.value", text)
        self._span.set_attribute(f"{which}.mime_type", mime)

    @_runtime.guarded(None)
    def set_input(self, value: Any) -> None:
        if self._span.is_recording():
            self._io("input", value)

    @_runtime.guarded(None)
    def set_output(self, value: Any) -> None:
        if self._span.is_recording():
            self._io("output", value)

    @_runtime.guarded(None)
    def set_attribute(self, key: str, value: Any) -> None:
        if self._span.is_recording() and value is not None:
            self._span.set_attribute(str(key), _attribute_value(value))

    @_runtime.guarded(None)
    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for k, v in attributes.items():
            self.set_attribute(k, v)

    @_runtime.guarded(None)
    def set_model(self, model: str, provider: str | None = None) -> None:
        """The model an LLM span called (``llm.model_name``), and its provider (``llm.provider``)."""
        self.set_attribute("llm.model_name", model)
        self.set_attribute("llm.provider", provider)

    @_runtime.guarded(None)
    def set_usage(self, input_tokens: int | None = None, output_tokens: int | None = None) -> None:
        """Token counts of an LLM span; keel prices them from the model name."""
        self.set_attribute("llm.token_count.prompt", input_tokens)
        self.set_attribute("llm.token_count.completion", output_tokens)
        if input_tokens is not None and output_tokens is not None:
            self.set_attribute("llm.token_count.total", input_tokens + output_tokens)

    @_runtime.guarded(None)
    def record_exception(self, exc: BaseException) -> None:
        """Mark the span failed with ``exc`` (done for you when an exception leaves the span)."""
        if self._span.is_recording():
            self._span.record_exception(exc, escaped=True)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:1000]))


def current_span() -> SpanHandle:
    """The innermost active span (a no-op handle outside any span)."""
    return SpanHandle(trace.get_current_span())


class _Active:
    """A started span plus how to finish it."""

    __slots__ = ("capture_output", "done", "kind", "span")

    def __init__(self, span: trace.Span, kind: str, capture_output: bool) -> None:
        self.span = span
        self.kind = kind
        self.capture_output = capture_output
        self.done = False


def _start(
    name: str, kind: str, capture_input: bool, capture_output: bool, arguments: Callable[[], Any]
) -> _Active | None:
    try:
        attrs: dict[str, Any] = {ATTR_KIND: kind, **_context.propagated_attributes(_context.current())}
        s = _runtime.tracer().start_span(name, attributes=attrs)
        if capture_input and s.is_recording():
            SpanHandle(s)._io("input", arguments())
        return _Active(s, kind, capture_output)
    except Exception:
        _runtime.count_error("observe.start")
        return None


_Tokens = tuple[object, Token[_context.Propagated]] | None


def _attach(a: _Active) -> _Tokens:
    try:
        return otel_context.attach(trace.set_span_in_context(a.span)), _context.scope()
    except Exception:
        _runtime.count_error("observe.attach")
        return None


def _detach(tokens: _Tokens) -> None:
    if tokens is None:
        return
    try:
        _context.end_scope(tokens[1])
        otel_context.detach(tokens[0])  # type: ignore[arg-type]
    except Exception:
        _runtime.count_error("observe.detach")


def _finish(a: _Active, result: Any = _UNSET, exc: BaseException | None = None) -> None:
    if a.done:
        return
    a.done = True
    try:
        s = a.span
        if s.is_recording():
            if exc is not None:
                SpanHandle(s).record_exception(exc)
            else:
                attrs = getattr(s, "attributes", None) or {}
                if a.capture_output and result is not _UNSET and "output.value" not in attrs:
                    SpanHandle(s)._io("output", result)
                if a.kind == "LLM" and result is not _UNSET:
                    model, inp, out = usage_of(result)
                    h = SpanHandle(s)
                    if model and "llm.model_name" not in attrs:
                        h.set_model(model)
                    if (inp is not None or out is not None) and "llm.token_count.prompt" not in attrs:
                        h.set_usage(inp, out)
                s.set_status(Status(StatusCode.OK))
        s.end()
    except Exception:
        _runtime.count_error("observe.finish")


def _collected(items: list[Any], extra: int) -> Any:
    if items and all(isinstance(i, str) for i in items) and not extra:
        return "".join(items)  # a stream of text chunks reads best as the text
    return [*items, f"... [{extra} more items]"] if extra else items


class SpanScope(SpanHandle):
    """``with span(...) as s:`` (or ``async with``): a span around a block; ``s`` is its handle."""

    __slots__ = ("_active", "_capture_output", "_input", "_kind", "_name", "_tokens")

    def __init__(self, name: str, kind: str, input: Any, capture_output: bool) -> None:
        super().__init__(trace.INVALID_SPAN)
        self._name = name
        self._kind = kind
        self._input = input
        self._capture_output = capture_output
        self._active: _Active | None = None
        self._tokens: _Tokens = None

    def __enter__(self) -> SpanScope:
        inp = self._input
        self._active = _start(self._name, self._kind, inp is not _UNSET, self._capture_output, lambda: inp)
        if self._active is not None:
            self._span = self._active.span
            self._tokens = _attach(self._active)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _detach(self._tokens)
        self._tokens = None
        if self._active is not None:
            _finish(self._active, exc=exc)

    async def __aenter__(self) -> SpanScope:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def span(name: str, *, kind: str = "chain", input: Any = _UNSET, capture_output: bool = True) -> SpanScope:
    """A span around a ``with`` block; set its output with ``s.set_output(...)``."""
    return SpanScope(str(name), _kind(kind), input, capture_output)


@overload
def observe(func: F, /) -> F: ...
@overload
def observe(
    *,
    name: str | None = None,
    kind: str = "chain",
    capture_input: bool | None = None,
    capture_output: bool | None = None,
) -> Callable[[F], F]: ...
def observe(
    func: Any = None,
    /,
    *,
    name: str | None = None,
    kind: str = "chain",
    capture_input: bool | None = None,
    capture_output: bool | None = None,
) -> Any:
    """Trace each call of a function (sync, async, generator or async generator) as a span.

    ``kind`` is an OpenInference span kind (llm, chain, tool, retriever, embedding, agent, reranker,
    guardrail, evaluator).  Arguments and the return value (for generators: the items yielded) are
    captured as input and output unless ``capture_input``/``capture_output`` say otherwise
    (default: what :func:`keel.sdk.init` was given).  An exception is recorded and re-raised.
    """
    if func is not None:
        return observe(name=name, kind=kind, capture_input=capture_input, capture_output=capture_output)(func)
    span_kind = _kind(kind)

    def deco(fn: F) -> F:
        try:
            return _wrap(
                fn,
                name or getattr(fn, "__qualname__", None) or repr(fn),
                span_kind,
                capture_input,
                capture_output,
            )
        except Exception:
            _runtime.count_error("observe.wrap")
            return fn

    return deco


def _capture(flag: bool | None, which: str) -> bool:
    if flag is not None:
        return flag
    rt = _runtime.active()
    return rt is None or bool(getattr(rt.config, which))


def _wrap(fn: Any, name: str, kind: str, capture_input: bool | None, capture_output: bool | None) -> Any:
    sig = signature_of(fn)

    def start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Active | None:
        return _start(
            name,
            kind,
            _capture(capture_input, "capture_input"),
            _capture(capture_output, "capture_output"),
            lambda: bind_arguments(sig, args, kwargs),
        )

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def agen_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            a = start(args, kwargs)
            agen = fn(*args, **kwargs)  # creating it runs none of its code
            items: list[Any] = []
            extra = 0
            sent: Any = None
            thrown: BaseException | None = None
            try:
                while True:
                    tokens = _attach(a) if a else None
                    try:
                        item = await (agen.athrow(thrown) if thrown is not None else agen.asend(sent))
                    except StopAsyncIteration:
                        if a:
                            _finish(a, _collected(items, extra))
                        return
                    except BaseException as exc:
                        if a:
                            _finish(a, exc=exc)
                        raise
                    finally:
                        _detach(tokens)
                    if len(items) < _MAX_ITEMS:
                        items.append(item)
                    else:
                        extra += 1
                    thrown = None
                    try:
                        sent = yield item
                    except GeneratorExit:
                        raise
                    except BaseException as exc:
                        thrown, sent = exc, None
            finally:
                if a and not a.done:  # closed early by the consumer
                    tokens = _attach(a)
                    try:
                        await agen.aclose()
                    finally:
                        _detach(tokens)
                        _finish(a, _collected(items, extra))

        return agen_wrapper

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            a = start(args, kwargs)
            if a is None:
                return await fn(*args, **kwargs)
            tokens = _attach(a)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                _detach(tokens)
                _finish(a, exc=exc)
                raise
            _detach(tokens)
            _finish(a, result)
            return result

        return async_wrapper

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            a = start(args, kwargs)
            gen = fn(*args, **kwargs)  # creating it runs none of its code
            items: list[Any] = []
            extra = 0
            sent: Any = None
            thrown: BaseException | None = None
            try:
                while True:
                    tokens = _attach(a) if a else None
                    try:
                        item = gen.throw(thrown) if thrown is not None else gen.send(sent)
                    except StopIteration as stop:
                        if a:
                            _finish(a, _collected(items, extra))
                        return stop.value
                    except BaseException as exc:
                        if a:
                            _finish(a, exc=exc)
                        raise
                    finally:
                        _detach(tokens)
                    if len(items) < _MAX_ITEMS:
                        items.append(item)
                    else:
                        extra += 1
                    thrown = None
                    try:
                        sent = yield item
                    except GeneratorExit:
                        raise
                    except BaseException as exc:
                        thrown, sent = exc, None
            finally:
                if a and not a.done:  # closed early by the consumer (or garbage-collected)
                    tokens = _attach(a)
                    try:
                        gen.close()
                    finally:
                        _detach(tokens)
                        _finish(a, _collected(items, extra))

        return gen_wrapper

    @functools.wraps(fn)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        a = start(args, kwargs)
        if a is None:
            return fn(*args, **kwargs)
        tokens = _attach(a)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _detach(tokens)
            _finish(a, exc=exc)
            raise
        _detach(tokens)
        _finish(a, result)
        return result

    return sync_wrapper
