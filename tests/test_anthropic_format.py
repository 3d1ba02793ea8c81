"""Conformance tests for keel.providers.anthropic_format (OpenAI <-> Anthropic wire translation)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
    CompletionCreateParamsStreaming,
)
from pydantic import TypeAdapter

from keel.providers.anthropic_format import (
    JSON_OBJECT_INSTRUCTION,
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    TranslationContext,
    TranslationError,
    UpstreamStreamError,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)

JSON = dict[str, Any]
MODEL = "claude-upstream"
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
PDF_B64 = "JVBERi0xLjQKJcfsj6IKNSAwIG9iago="

_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)  # type: ignore[arg-type]


def _force(value: Any) -> Any:
    """Consume pydantic's lazy ValidatorIterators so that TypedDict validation really happens."""
    if isinstance(value, dict):
        return {k: _force(v) for k, v in value.items()}
    if value is None or isinstance(value, str | bytes | int | float | bool):
        return value
    if isinstance(value, list):
        return [_force(v) for v in value]
    try:
        iterator = iter(value)
    except TypeError:
        return value
    return [_force(v) for v in iterator]


# adapters must outlive the lazy iterators they return, hence module-level
_ANTHROPIC_PARAMS: dict[bool, TypeAdapter[Any]] = {
    True: TypeAdapter(MessageCreateParamsStreaming),
    False: TypeAdapter(MessageCreateParamsNonStreaming),
}
_OPENAI_PARAMS: dict[bool, TypeAdapter[Any]] = {
    True: TypeAdapter(CompletionCreateParamsStreaming),
    False: TypeAdapter(CompletionCreateParamsNonStreaming),
}


def assert_valid_anthropic_request(body: JSON) -> None:
    """Validate against the official SDK's request TypedDicts (types, literals, required keys)."""
    _force(_ANTHROPIC_PARAMS[bool(body.get("stream"))].validate_python(body))


def assert_valid_openai_request(body: JSON) -> None:
    """Validate against the official SDK's request TypedDicts (types, literals, required keys)."""
    _force(_OPENAI_PARAMS[bool(body.get("stream"))].validate_python(body))


def user(content: Any) -> JSON:
    return {"role": "user", "content": content}


def oa(*messages: JSON, **params: Any) -> JSON:
    return {"model": "gpt-4o", "messages": list(messages), **params}


def an(*messages: JSON, **params: Any) -> JSON:
    return {"model": MODEL, "max_tokens": 4096, "messages": list(messages), **params}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
WEATHER_TOOL_AN = {
    "name": "get_weather",
    "description": "Current weather",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
}
TOOL_USE = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}}

# ---------------------------------------------------------------------------------------------------
# OpenAI request -> Anthropic request
# ---------------------------------------------------------------------------------------------------

REQUEST_CASES: list[tuple[str, JSON, JSON]] = [
    ("plain-user", oa(user("Hi")), an(user("Hi"))),
    (
        "system-and-developer-joined",
        oa(
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": "No emoji."},
            user("Hi"),
        ),
        an(user("Hi"), system="Be terse.\n\nNo emoji."),
    ),
    (
        "system-as-parts",
        oa(
            {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
            user("x"),
        ),
        an(user("x"), system="A\n\nB"),
    ),
    (
        "system-cache-control-kept-as-blocks",
        oa(
            {
                "role": "system",
                "content": [{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}],
            },
            user("x"),
        ),
        an(user("x"), system=[{"type": "text", "text": "long", "cache_control": {"type": "ephemeral"}}]),
    ),
    (
        "multi-part-text",
        oa(user([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])),
        an(user([{"type": "text", "text": "one"}, {"type": "text", "text": "two"}])),
    ),
    (
        "images-data-and-http",
        oa(
            user(
                [
                    {"type": "text", "text": "Compare"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ]
            )
        ),
        an(
            user(
                [
                    {"type": "text", "text": "Compare"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                ]
            )
        ),
    ),
    (
        "pdf-file-part",
        oa(
            user(
                [
                    {
                        "type": "file",
                        "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"},
                    }
                ]
            )
        ),
        an(
            user(
                [
                    {
                        "type": "document",
                        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                    }
                ]
            )
        ),
    ),
    (
        "consecutive-same-role-merged",
        oa(
            user("a"),
            user("b"),
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": "d"},
            user("e"),
        ),
        an(
            user([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
            {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
            user("e"),
        ),
    ),
    (
        "tools-definitions",
        oa(
            user("w?"),
            tools=[
                WEATHER_TOOL,
                {"type": "function", "function": {"name": "now"}},
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}},
                },
            ],
        ),
        an(
            user("w?"),
            tools=[
                WEATHER_TOOL_AN,
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
                {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            ],
        ),
    ),
    (
        "tool-calls-and-results-round-trip",
        oa(
            user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    CALL,
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"}]},
            user("Thanks, which is warmer?"),
            tools=[WEATHER_TOOL],
        ),
        an(
            user("Weather in Paris and Rome?"),
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    TOOL_USE,
                    {
                        "type": "tool_use",
                        "id": "call_2",
                        "name": "get_weather",
                        "input": {"location": "Rome"},
                    },
                ],
            },
            user(
                [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_2",
                        "content": [{"type": "text", "text": "25C"}],
                    },
                    {"type": "text", "text": "Thanks, which is warmer?"},
                ]
            ),
            tools=[WEATHER_TOOL_AN],
        ),
    ),
    (
        "tool-call-without-arguments-and-null-content",
        oa(
            user("time?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}],
            },
            {"role": "tool", "tool_call_id": "c", "content": ""},
        ),
        an(
            user("time?"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "now", "input": {}}]},
            user([{"type": "tool_result", "tool_use_id": "c"}]),
        ),
    ),
    (
        "assistant-prefill-trailing-whitespace-stripped",
        oa(user("JSON please"), {"role": "assistant", "content": "{ \n"}),
        an(user("JSON please"), {"role": "assistant", "content": "{"}),
    ),
    (
        "stop-string",
        oa(user("x"), stop="END"),
        an(user("x"), stop_sequences=["END"]),
    ),
    (
        "stop-list",
        oa(user("x"), stop=["\n\n", "Observation:"]),
        an(user("x"), stop_sequences=["\n\n", "Observation:"]),
    ),
    (
        "sampling-params-and-dropped-openai-only-params",
        oa(
            user("x"),
            max_tokens=100,
            max_completion_tokens=200,
            temperature=1.7,
            top_p=0.9,
            stream=True,
            stream_options={"include_usage": True},
            user="user-42",
            n=1,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={"50256": -100},
            logprobs=True,
            top_logprobs=2,
            seed=7,
            service_tier="auto",
            store=False,
            metadata={"k": "v"},
            reasoning_effort="low",
        ),
        an(
            user("x"),
            max_tokens=200,
            temperature=1.0,
            top_p=0.9,
            stream=True,
            metadata={"user_id": "user-42"},
        ),
    ),
    (
        "max-tokens",
        oa(user("x"), max_tokens=77, temperature=0),
        {"model": MODEL, "max_tokens": 77, "messages": [user("x")], "temperature": 0.0},
    ),
    (
        "response-format-json-object",
        oa(
            {"role": "system", "content": "You extract data."},
            user("x"),
            response_format={"type": "json_object"},
        ),
        an(user("x"), system=f"You extract data.\n\n{JSON_OBJECT_INSTRUCTION}"),
    ),
    (
        "response-format-text-is-noop",
        oa(user("x"), response_format={"type": "text"}),
        an(user("x")),
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES]
)
def test_openai_to_anthropic_request(body: JSON, expected: JSON) -> None:
    original = copy.deepcopy(body)
    out, ctx = openai_to_anthropic_request(body, MODEL)
    assert out == expected
    assert body == original, "input must not be mutated"
    assert isinstance(ctx, TranslationContext)
    assert ctx.json_tool_name is None
    assert_valid_anthropic_request(out)


TOOL_CHOICE_CASES: list[tuple[str, Any, bool | None, JSON | None]] = [
    ("absent", None, None, None),
    ("auto", "auto", None, {"type": "auto"}),
    ("required", "required", None, {"type": "any"}),
    ("none", "none", None, {"type": "none"}),
    (
        "function",
        {"type": "function", "function": {"name": "get_weather"}},
        None,
        {"type": "tool", "name": "get_weather"},
    ),
    ("parallel-false-no-choice", None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("parallel-false-required", "required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (
        "parallel-false-function",
        {"type": "function", "function": {"name": "get_weather"}},
        False,
        {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ),
    ("parallel-false-none", "none", False, {"type": "none"}),
    ("parallel-true", "auto", True, {"type": "auto"}),
]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [c[1:] for c in TOOL_CHOICE_CASES],
    ids=[c[0] for c in TOOL_CHOICE_CASES],
)
def test_tool_choice_mapping(choice: Any, parallel: bool | None, expected: JSON | None) -> None:
    params: JSON = {"tools": [WEATHER_TOOL]}
    if choice is not None:
        params["tool_choice"] = choice
    if parallel is not None:
        params["parallel_tool_calls"] = parallel
    out, _ = openai_to_anthropic_request(oa(user("x"), **params), MODEL)
    assert out.get("tool_choice") == expected
    assert_valid_anthropic_request(out)


def test_tool_choice_without_tools_is_dropped() -> None:
    out, _ = openai_to_anthropic_request(oa(user("x"), tool_choice="auto", parallel_tool_calls=False), MODEL)
    assert "tool_choice" not in out and "tools" not in out


def test_default_max_tokens_and_context_flags() -> None:
    out, ctx = openai_to_anthropic_request(
        oa(user("x"), stream=True, stream_options={"include_usage": True}), MODEL, default_max_tokens=1234
    )
    assert out["max_tokens"] == 1234
    assert ctx == TranslationContext(json_tool_name=None, include_usage=True, stream=True)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

JSON_SCHEMA_CASES: list[tuple[str, JSON, str, list[str], JSON]] = [
    (
        "named-schema-forced",
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        "person",
        ["person"],
        {"type": "tool", "name": "person"},
    ),
    (
        "default-name",
        {"type": "json_schema", "json_schema": {"schema": PERSON_SCHEMA}},
        "json_response",
        ["json_response"],
        {"type": "tool", "name": "json_response"},
    ),
]


@pytest.mark.parametrize(
    ("response_format", "tool_name", "tool_names", "tool_choice"),
    [c[1:] for c in JSON_SCHEMA_CASES],
    ids=[c[0] for c in JSON_SCHEMA_CASES],
)
def test_response_format_json_schema_becomes_forced_tool(
    response_format: JSON, tool_name: str, tool_names: list[str], tool_choice: JSON
) -> None:
    out, ctx = openai_to_anthropic_request(oa(user("Ann is 31"), response_format=response_format), MODEL)
    assert ctx.json_tool_name == tool_name
    assert [t["name"] for t in out["tools"]] == tool_names
    assert out["tools"][-1]["input_schema"] == PERSON_SCHEMA
    assert out["tools"][-1]["description"]
    assert out["tool_choice"] == tool_choice
    assert "system" not in out
    assert_valid_anthropic_request(out)


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, {"type": "any"}),
        ("auto", {"type": "any"}),
        ("required", {"type": "any"}),
        ("none", {"type": "tool", "name": "person"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_response_format_json_schema_with_user_tools(tool_choice: Any, expected: JSON) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    params: JSON = {"tools": [WEATHER_TOOL], "response_format": rf}
    if tool_choice is not None:
        params["tool_choice"] = tool_choice
    out, ctx = openai_to_anthropic_request(oa(user("x"), **params), MODEL)
    assert [t["name"] for t in out["tools"]] == ["get_weather", "person"]
    assert out["tool_choice"] == expected
    assert ctx.json_tool_name == "person"


REQUEST_ERROR_CASES: list[tuple[str, JSON, str]] = [
    (
        "bad-tool-arguments",
        oa(
            user("x"),
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
                ],
            },
        ),
        "not valid JSON",
    ),
    (
        "tool-arguments-not-object",
        oa(
            user("x"),
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                ],
            },
        ),
        "JSON object",
    ),
    ("n-greater-than-one", oa(user("x"), n=2), "n=2"),
    ("no-messages", oa(), "non-empty"),
    ("system-only", oa({"role": "system", "content": "x"}), "at least one"),
    ("unknown-role", oa({"role": "narrator", "content": "x"}), "unsupported role"),
    ("legacy-function-role", oa({"role": "function", "name": "f", "content": "x"}), "legacy"),
    ("legacy-functions-param", oa(user("x"), functions=[{"name": "f"}]), "legacy"),
    ("audio-output", oa(user("x"), modalities=["text", "audio"]), "audio"),
    (
        "audio-input-part",
        oa(user([{"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}])),
        "input_audio",
    ),
    ("ftp-image", oa(user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}])), "http"),
    (
        "non-base64-data-url",
        oa(user([{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}])),
        "base64",
    ),
    ("file-id", oa(user([{"type": "file", "file": {"file_id": "file-1"}}])), "inline"),
    ("tool-without-id", oa(user("x"), {"role": "tool", "content": "r"}), "tool_call_id"),
    ("custom-tool", oa(user("x"), tools=[{"type": "custom", "custom": {"name": "g"}}]), "function"),
    ("bad-tool-choice", oa(user("x"), tools=[WEATHER_TOOL], tool_choice="sometimes"), "tool_choice"),
    ("bad-response-format", oa(user("x"), response_format={"type": "yaml"}), "response_format"),
    (
        "json-schema-name-collision",
        oa(
            user("x"),
            tools=[WEATHER_TOOL],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "get_weather", "schema": PERSON_SCHEMA},
            },
        ),
        "collides",
    ),
    (
        "json-schema-not-object",
        oa(
            user("x"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "l", "schema": {"type": "array"}},
            },
        ),
        "JSON object",
    ),
    ("bad-max-tokens", oa(user("x"), max_tokens=0), "max_tokens"),
    ("bad-temperature", oa(user("x"), temperature="hot"), "temperature"),
]


@pytest.mark.parametrize(
    ("body", "match"), [c[1:] for c in REQUEST_ERROR_CASES], ids=[c[0] for c in REQUEST_ERROR_CASES]
)
def test_openai_to_anthropic_request_errors(body: JSON, match: str) -> None:
    with pytest.raises(TranslationError, match=match) as info:
        openai_to_anthropic_request(body, MODEL)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------
# Anthropic response -> OpenAI response
# ---------------------------------------------------------------------------------------------------


def anthropic_message(content: list[JSON], stop_reason: str = "end_turn", **usage: int) -> JSON:
    return {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


JSON_CTX = TranslationContext(json_tool_name="person")
PERSON_USE = {"type": "tool_use", "id": "toolu_9", "name": "person", "input": {"name": "Ann", "age": 31}}

RESPONSE_CASES: list[tuple[str, JSON, TranslationContext | None, str | None, list[JSON] | None, str]] = [
    ("text", anthropic_message([{"type": "text", "text": "Hello!"}]), None, "Hello!", None, "stop"),
    (
        "multiple-text-blocks-joined",
        anthropic_message([{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}], "stop_sequence"),
        None,
        "Hello",
        None,
        "stop",
    ),
    (
        "max-tokens",
        anthropic_message([{"type": "text", "text": "Trunc"}], "max_tokens"),
        None,
        "Trunc",
        None,
        "length",
    ),
    ("refusal", anthropic_message([], "refusal"), None, None, None, "content_filter"),
    (
        "tool-use",
        anthropic_message([{"type": "text", "text": "Let me check."}, TOOL_USE], "tool_use"),
        None,
        "Let me check.",
        [CALL],
        "tool_calls",
    ),
    (
        "tool-use-only-no-content",
        anthropic_message([TOOL_USE], "tool_use"),
        None,
        None,
        [CALL],
        "tool_calls",
    ),
    (
        "thinking-dropped",
        anthropic_message(
            [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "42"}]
        ),
        None,
        "42",
        None,
        "stop",
    ),
    (
        "json-schema-tool-becomes-content",
        anthropic_message([{"type": "text", "text": "Here you go:"}, PERSON_USE], "tool_use"),
        JSON_CTX,
        '{"name":"Ann","age":31}',
        None,
        "stop",
    ),
    (
        "json-schema-tool-without-ctx-stays-tool-call",
        anthropic_message([PERSON_USE], "tool_use"),
        None,
        None,
        [
            {
                "id": "toolu_9",
                "type": "function",
                "function": {"name": "person", "arguments": '{"name":"Ann","age":31}'},
            }
        ],
        "tool_calls",
    ),
    (
        "json-schema-ctx-but-real-tool-called",
        anthropic_message([TOOL_USE], "tool_use"),
        JSON_CTX,
        None,
        [CALL],
        "tool_calls",
    ),
    (
        "json-schema-truncated",
        anthropic_message([PERSON_USE], "max_tokens"),
        JSON_CTX,
        '{"name":"Ann","age":31}',
        None,
        "length",
    ),
]


@pytest.mark.parametrize(
    ("resp", "ctx", "content", "tool_calls", "finish"),
    [c[1:] for c in RESPONSE_CASES],
    ids=[c[0] for c in RESPONSE_CASES],
)
def test_anthropic_to_openai_response(
    resp: JSON,
    ctx: TranslationContext | None,
    content: str | None,
    tool_calls: list[JSON] | None,
    finish: str,
) -> None:
    Message.model_validate(resp)  # the fixture itself is a valid Anthropic message
    out = anthropic_to_openai_response(resp, "gpt-4o", ctx, created=1_700_000_000)
    parsed = ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_01ABC"
    assert out["object"] == "chat.completion"
    assert out["created"] == 1_700_000_000
    assert out["model"] == "gpt-4o"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == content
    assert choice["message"].get("tool_calls") == tool_calls
    assert choice["finish_reason"] == finish
    assert parsed.choices[0].finish_reason == finish
    for call in tool_calls or []:
        json.loads(call["function"]["arguments"])


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (
            {"input_tokens": 10, "output_tokens": 5},
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        ),
        (
            {
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200,
            },
            {
                "prompt_tokens": 1210,
                "completion_tokens": 5,
                "total_tokens": 1215,
                "prompt_tokens_details": {"cached_tokens": 1000},
            },
        ),
        (
            {
                "input_tokens": 3,
                "output_tokens": 1,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
            },
            {
                "prompt_tokens": 3,
                "completion_tokens": 1,
                "total_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        ),
    ],
    ids=["plain", "cache-read-and-write", "null-cache-fields"],
)
def test_usage_mapping(usage: JSON, expected: JSON) -> None:
    resp = anthropic_message([{"type": "text", "text": "x"}])
    resp["usage"] = usage
    out = anthropic_to_openai_response(resp, "gpt-4o")
    assert out["usage"] == expected
    ChatCompletion.model_validate(out)


# ---------------------------------------------------------------------------------------------------
# Anthropic stream -> OpenAI stream
# ---------------------------------------------------------------------------------------------------


def _text_delta(index: int, text: str) -> JSON:
    return {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}


def _json_delta(index: int, fragment: str) -> JSON:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": fragment},
    }


def _tool_start(index: int, tool_id: str, name: str) -> JSON:
    return {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
    }


def _message_start(**usage: int) -> JSON:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_01STREAM",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1, **usage},
        },
    }


ARGS_FRAGMENTS = ["", '{"loc', 'ation": "Pa', "ris, Fr", 'ance", "unit"', ': "celsius"}']
ANTHROPIC_EVENTS: list[JSON] = [
    _message_start(cache_read_input_tokens=100, cache_creation_input_tokens=7),
    {"type": "ping"},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "Let me think"},
    },
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    _text_delta(1, "Hello"),
    _text_delta(1, ", wörld! "),
    _text_delta(1, "Checking the weather."),
    {"type": "content_block_stop", "index": 1},
    _tool_start(2, "toolu_01A", "get_weather"),
    *[_json_delta(2, f) for f in ARGS_FRAGMENTS],
    {"type": "content_block_stop", "index": 2},
    _tool_start(3, "toolu_01B", "now"),  # a tool without parameters: no input_json_delta at all
    {"type": "content_block_stop", "index": 3},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42},
    },
    {"type": "ping"},
    {"type": "message_stop"},
]


def _reconstruct(chunks: list[JSON]) -> tuple[str, dict[int, JSON], list[str]]:
    text = ""
    calls: dict[int, JSON] = {}
    finishes: list[str] = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                if tc.get("id"):
                    call["id"] = tc["id"]
                fn = tc.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
    return text, calls, finishes


def test_anthropic_stream_to_openai_chunks() -> None:
    for event in ANTHROPIC_EVENTS:
        if event["type"] != "ping":  # ping is not part of the SDK union
            _EVENT.validate_python(event)  # the fixture is a valid Anthropic stream
    stream = AnthropicToOpenAIStream("gpt-4o", include_usage=True, created=1_700_000_000)
    chunks = [chunk for event in ANTHROPIC_EVENTS for chunk in stream.feed(event)]

    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["id"] == "chatcmpl-msg_01STREAM"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "gpt-4o"
        assert chunk["created"] == 1_700_000_000

    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text, calls, finishes = _reconstruct(chunks)
    assert text == "Hello, wörld! Checking the weather."
    assert calls == {
        0: {
            "id": "toolu_01A",
            "name": "get_weather",
            "arguments": '{"location": "Paris, France", "unit": "celsius"}',
        },
        1: {"id": "toolu_01B", "name": "now", "arguments": "{}"},
    }
    assert finishes == ["tool_calls"]

    # first tool delta carries index/id/type/name and empty arguments; later ones only index + fragment
    tool_deltas = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls") or []]
    assert tool_deltas[0] == {
        "index": 0,
        "id": "toolu_01A",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert [d["function"]["arguments"] for d in tool_deltas[1:5]] == [f for f in ARGS_FRAGMENTS if f][:4]
    assert all(set(d) == {"index", "function"} for d in tool_deltas[1:5])

    # the finish chunk precedes the usage chunk, which is last and has no choices
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    expected_usage = {
        "prompt_tokens": 132,
        "completion_tokens": 42,
        "total_tokens": 174,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert chunks[-1]["usage"] == expected_usage
    assert all(c["usage"] is None for c in chunks[:-1])

    assert stream.text == text
    assert stream.finish_reason == "tool_calls"
    assert stream.usage == expected_usage
    assert [c["function"]["arguments"] for c in stream.tool_calls] == [calls[0]["arguments"], "{}"]
    assert stream.done

    # the official SDK accumulator agrees
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Hello, wörld! Checking the weather."
    assert message.tool_calls is not None
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("toolu_01A", "get_weather", {"location": "Paris, France", "unit": "celsius"}),
        ("toolu_01B", "now", {}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 174


def test_anthropic_stream_matches_non_streaming_translation() -> None:
    """Streaming and non-streaming translations of the same message agree."""
    stream = AnthropicToOpenAIStream("gpt-4o")
    for event in ANTHROPIC_EVENTS:
        stream.feed(event)
    resp = anthropic_message(
        [
            {"type": "text", "text": "Hello, wörld! Checking the weather."},
            {
                "type": "tool_use",
                "id": "toolu_01A",
                "name": "get_weather",
                "input": {"location": "Paris, France", "unit": "celsius"},
            },
            {"type": "tool_use", "id": "toolu_01B", "name": "now", "input": {}},
        ],
        "tool_use",
        input_tokens=25,
        output_tokens=42,
        cache_read_input_tokens=100,
        cache_creation_input_tokens=7,
    )
    out = anthropic_to_openai_response(resp, "gpt-4o")
    msg = out["choices"][0]["message"]
    assert msg["content"] == stream.text
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [
        json.loads(c["function"]["arguments"]) for c in stream.tool_calls
    ]
    assert out["usage"] == stream.usage
    assert out["choices"][0]["finish_reason"] == stream.finish_reason


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ],
)
def test_anthropic_stream_finish_reasons_and_no_usage_chunk(stop_reason: str, finish: str) -> None:
    events = [
        _message_start(),
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        _text_delta(0, "hi"),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 3},
        },
        {"type": "message_stop"},
    ]
    stream = AnthropicToOpenAIStream("gpt-4o", include_usage=False)
    chunks = [c for e in events for c in stream.feed(e)]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert "usage" not in chunk
        assert len(chunk["choices"]) == 1
    assert _reconstruct(chunks)[2] == [finish]
    assert stream.finish_reason == finish
    assert stream.usage["completion_tokens"] == 3 and stream.usage["prompt_tokens"] == 25


def test_anthropic_stream_json_schema_tool_streams_as_content() -> None:
    events = [
        _message_start(),
        _tool_start(0, "toolu_1", "person"),
        _json_delta(0, '{"name": "A'),
        _json_delta(0, 'nn", "age": 31}'),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
        {"type": "message_stop"},
    ]
    stream = AnthropicToOpenAIStream("gpt-4o", ctx=JSON_CTX)
    chunks = [c for e in events for c in stream.feed(e)]
    text, calls, finishes = _reconstruct(chunks)
    assert calls == {}
    assert json.loads(text) == {"name": "Ann", "age": 31}
    assert finishes == ["stop"]
    assert stream.text == text
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)


def test_anthropic_stream_error_event_raises() -> None:
    stream = AnthropicToOpenAIStream("gpt-4o")
    stream.feed(_message_start())
    with pytest.raises(UpstreamStreamError, match="Overloaded") as info:
        stream.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert info.value.error_type == "overloaded_error"
    assert info.value.message == "Overloaded"


# ---------------------------------------------------------------------------------------------------
# Anthropic request -> OpenAI request (reverse ingress)
# ---------------------------------------------------------------------------------------------------


REVERSE_REQUEST_CASES: list[tuple[str, JSON, JSON]] = [
    (
        "system-string-and-params",
        {
            "model": "claude-x",
            "max_tokens": 256,
            "system": "Be terse.",
            "messages": [user("Hi")],
            "temperature": 0.2,
            "top_p": 0.8,
            "top_k": 5,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u1"},
        },
        {
            "model": "claude-x",
            "messages": [{"role": "system", "content": "Be terse."}, user("Hi")],
            "max_tokens": 256,
            "temperature": 0.2,
            "top_p": 0.8,
            "stop": ["END"],
            "user": "u1",
        },
    ),
    (
        "system-blocks-images-documents",
        {
            "model": "m",
            "max_tokens": 10,
            "stream": True,
            "system": [
                {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "B"},
            ],
            "messages": [
                user(
                    [
                        {"type": "text", "text": "Look"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF_B64},
                        },
                    ]
                )
            ],
        },
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "A\n\nB"},
                user(
                    [
                        {"type": "text", "text": "Look"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {
                            "type": "file",
                            "file": {
                                "filename": "document.pdf",
                                "file_data": f"data:application/pdf;base64,{PDF_B64}",
                            },
                        },
                    ]
                ),
            ],
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "tool-use-and-results",
        {
            "model": "m",
            "max_tokens": 10,
            "tools": [WEATHER_TOOL_AN, {"name": "now", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": [
                user("Weather?"),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        TOOL_USE,
                    ],
                },
                user(
                    [
                        {
                            "type": "tool_result",
                            "tool_use_id": "call_1",
                            "content": [{"type": "text", "text": "18C"}],
                        },
                        {"type": "text", "text": "And tomorrow?"},
                    ]
                ),
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "call_2", "name": "now", "input": {}}],
                },
                user([{"type": "tool_result", "tool_use_id": "call_2", "content": "boom", "is_error": True}]),
            ],
        },
        {
            "model": "m",
            "messages": [
                user("Weather?"),
                {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                user("And tomorrow?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_2", "content": "Error: boom"},
            ],
            "max_tokens": 10,
            "tools": [
                WEATHER_TOOL,
                {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
            ],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in REVERSE_REQUEST_CASES], ids=[c[0] for c in REVERSE_REQUEST_CASES]
)
def test_anthropic_to_openai_request(body: JSON, expected: JSON) -> None:
    assert_valid_anthropic_request(body)
    out = anthropic_to_openai_request(body)
    assert out == expected
    assert_valid_openai_request(out)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_reverse_tool_choice(choice: JSON, expected: Any) -> None:
    out = anthropic_to_openai_request(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [user("x")],
            "tools": [WEATHER_TOOL_AN],
            "tool_choice": choice,
        }
    )
    assert out["tool_choice"] == expected
    assert "parallel_tool_calls" not in out


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"model": "m", "max_tokens": 5, "messages": []}, "non-empty"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [user("x")],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "web_search",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ],
    ids=["empty", "server-tool", "bad-role"],
)
def test_anthropic_to_openai_request_errors(body: JSON, match: str) -> None:
    with pytest.raises(TranslationError, match=match):
        anthropic_to_openai_request(body)


def test_request_round_trip_openai_anthropic_openai() -> None:
    """OpenAI -> Anthropic -> OpenAI preserves the conversation structure."""
    body = oa(
        {"role": "system", "content": "Be terse."},
        user("Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=50,
        stop=["END"],
    )
    anthropic_body, _ = openai_to_anthropic_request(body, MODEL)
    back = anthropic_to_openai_request(anthropic_body)
    assert back["messages"] == body["messages"]
    assert back["tools"] == body["tools"]
    assert back["tool_choice"] == "auto"
    assert back["stop"] == ["END"]
    assert back["max_tokens"] == 50


# ---------------------------------------------------------------------------------------------------
# OpenAI response -> Anthropic response
# ---------------------------------------------------------------------------------------------------


def openai_completion(message: JSON, finish: str, **usage: Any) -> JSON:
    return {
        "id": "chatcmpl-XYZ",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, **usage},
    }


REVERSE_RESPONSE_CASES: list[tuple[str, JSON, list[JSON], str]] = [
    (
        "text",
        openai_completion({"role": "assistant", "content": "Hi there"}, "stop"),
        [{"type": "text", "text": "Hi there"}],
        "end_turn",
    ),
    (
        "length",
        openai_completion({"role": "assistant", "content": "Trunc"}, "length"),
        [{"type": "text", "text": "Trunc"}],
        "max_tokens",
    ),
    (
        "tool-calls",
        openai_completion({"role": "assistant", "content": "Checking.", "tool_calls": [CALL]}, "tool_calls"),
        [{"type": "text", "text": "Checking."}, TOOL_USE],
        "tool_use",
    ),
    (
        "content-filter",
        openai_completion({"role": "assistant", "content": None}, "content_filter"),
        [],
        "refusal",
    ),
    (
        "refusal-field",
        openai_completion(
            {"role": "assistant", "content": None, "refusal": "I can't help with that."}, "stop"
        ),
        [{"type": "text", "text": "I can't help with that."}],
        "refusal",
    ),
]


@pytest.mark.parametrize(
    ("resp", "content", "stop_reason"),
    [c[1:] for c in REVERSE_RESPONSE_CASES],
    ids=[c[0] for c in REVERSE_RESPONSE_CASES],
)
def test_openai_to_anthropic_response(resp: JSON, content: list[JSON], stop_reason: str) -> None:
    ChatCompletion.model_validate(resp)
    out = openai_to_anthropic_response(resp, "claude-sonnet-4-5")
    Message.model_validate(out)
    assert out["id"] == "msg_chatcmpl-XYZ"
    assert out["type"] == "message" and out["role"] == "assistant"
    assert out["model"] == "claude-sonnet-4-5"
    assert out["content"] == content
    assert out["stop_reason"] == stop_reason
    assert out["usage"] == {
        "input_tokens": 100,
        "output_tokens": 20,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


def test_openai_to_anthropic_response_cached_tokens_and_bad_arguments() -> None:
    resp = openai_completion(
        {"role": "assistant", "content": "x"}, "stop", prompt_tokens_details={"cached_tokens": 64}
    )
    assert openai_to_anthropic_response(resp, "c")["usage"] == {
        "input_tokens": 36,
        "output_tokens": 20,
        "cache_read_input_tokens": 64,
        "cache_creation_input_tokens": 0,
    }
    bad = openai_completion(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a":'}}],
        },
        "tool_calls",
    )
    with pytest.raises(TranslationError, match="not valid JSON"):
        openai_to_anthropic_response(bad, "c")


def test_response_round_trip_anthropic_openai_anthropic() -> None:
    original = anthropic_message(
        [{"type": "text", "text": "Checking."}, TOOL_USE], "tool_use", output_tokens=20
    )
    back = openai_to_anthropic_response(anthropic_to_openai_response(original, "gpt-4o"), "claude-sonnet-4-5")
    Message.model_validate(back)
    assert back["content"] == original["content"]
    assert back["stop_reason"] == "tool_use"
    assert back["usage"]["input_tokens"] == 10 and back["usage"]["output_tokens"] == 20


# ---------------------------------------------------------------------------------------------------
# OpenAI stream -> Anthropic stream
# ---------------------------------------------------------------------------------------------------


def _oa_chunk(delta: JSON | None = None, finish: str | None = None, *, usage: JSON | None = None) -> JSON:
    chunk: JSON = {
        "id": "chatcmpl-S1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        "usage": usage,
    }
    return chunk


OA_ARGS = ['{"lo', 'cation"', ': "Paris', '"}']
OPENAI_CHUNKS: list[JSON] = [
    _oa_chunk({"role": "assistant", "content": ""}),
    _oa_chunk({"content": "Hello"}),
    _oa_chunk({"content": ", world."}),
    _oa_chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    *[_oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in OA_ARGS],
    _oa_chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_B",
                    "type": "function",
                    "function": {"name": "now", "arguments": "{}"},
                }
            ]
        }
    ),
    _oa_chunk({}, "tool_calls"),
    _oa_chunk(
        usage={
            "prompt_tokens": 50,
            "completion_tokens": 12,
            "total_tokens": 62,
            "prompt_tokens_details": {"cached_tokens": 10},
        }
    ),
]


def assert_valid_anthropic_sequence(events: list[tuple[str, JSON]]) -> None:
    """Check the event grammar: message_start (block_start delta* block_stop)* message_delta message_stop."""
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("message_start") == names.count("message_delta") == names.count("message_stop") == 1
    open_index: int | None = None
    next_index = 0
    for name, data in events:
        assert data["type"] == name
        _EVENT.validate_python(data)
        if name == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        elif name in ("message_delta", "message_stop"):
            assert open_index is None


def _accumulate(events: list[tuple[str, JSON]]) -> Any:
    snapshot = None
    for _, data in events:
        snapshot = accumulate_event(event=_EVENT.validate_python(data), current_snapshot=snapshot)
    return snapshot


def test_openai_stream_to_anthropic_events() -> None:
    for chunk in OPENAI_CHUNKS:
        ChatCompletionChunk.model_validate(chunk)
    stream = OpenAIToAnthropicStream("claude-sonnet-4-5")
    events = [e for chunk in OPENAI_CHUNKS for e in stream.feed(chunk)]
    assert stream.done
    assert stream.finish() == []  # already closed by the trailing usage chunk
    assert_valid_anthropic_sequence(events)

    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        *["content_block_delta"] * len(OA_ARGS),
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["id"] == "msg_chatcmpl-S1"
    assert events[0][1]["message"]["model"] == "claude-sonnet-4-5"
    tool_starts = [d["content_block"] for n, d in events if n == "content_block_start"][1:]
    assert tool_starts == [
        {"type": "tool_use", "id": "call_A", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_B", "name": "now", "input": {}},
    ]
    fragments = [
        d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 1
    ]
    assert "".join(fragments) == '{"location": "Paris"}'
    message_delta = events[-2][1]
    assert message_delta["delta"]["stop_reason"] == "tool_use"
    assert message_delta["usage"] == {"input_tokens": 40, "output_tokens": 12, "cache_read_input_tokens": 10}

    final = _accumulate(events)
    assert final.content[0].type == "text" and final.content[0].text == "Hello, world."
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == (
        "call_A",
        "get_weather",
        {"location": "Paris"},
    )
    assert (final.content[2].name, final.content[2].input) == ("now", {})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (
        40,
        12,
        10,
    )
    assert stream.text == "Hello, world."
    assert stream.tool_calls == [
        {"id": "call_A", "name": "get_weather", "arguments": '{"location": "Paris"}'},
        {"id": "call_B", "name": "now", "arguments": "{}"},
    ]
    Message.model_validate(final.model_dump())


def test_openai_stream_without_usage_needs_finish() -> None:
    stream = OpenAIToAnthropicStream("claude-sonnet-4-5", message_id="msg_fixed")
    chunks = [_oa_chunk({"role": "assistant", "content": "Hi"}), _oa_chunk({}, "length")]
    events = [e for c in chunks for e in stream.feed(c)]
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    ]
    assert not stream.done
    events += stream.finish()
    assert stream.finish() == []
    assert stream.feed(_oa_chunk({"content": "late"})) == []
    assert_valid_anthropic_sequence(events)
    assert events[0][1]["message"]["id"] == "msg_fixed"
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert _accumulate(events).content[0].text == "Hi"


def test_openai_stream_empty_upstream_still_valid() -> None:
    stream = OpenAIToAnthropicStream("claude-sonnet-4-5")
    events = stream.finish()
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert_valid_anthropic_sequence(events)
    assert events[1][1]["delta"]["stop_reason"] == "end_turn"


def test_openai_stream_errors() -> None:
    stream = OpenAIToAnthropicStream("c")
    with pytest.raises(UpstreamStreamError, match="rate limited"):
        stream.feed({"error": {"message": "rate limited", "type": "rate_limit_error"}})
    interleaved = OpenAIToAnthropicStream("c")
    interleaved.feed(
        _oa_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}}]})
    )
    interleaved.feed(
        _oa_chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]})
    )
    with pytest.raises(TranslationError, match="interleaved"):
        interleaved.feed(_oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
