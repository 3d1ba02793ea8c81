"""Pure translation between the OpenAI Chat Completions and Anthropic Messages wire formats.

Everything in this module works on plain JSON-shaped ``dict[str, Any]`` values: no I/O, no SDK
objects and no imports from other keel modules, so it can be unit tested exhaustively and reused by
any transport.

Forward direction (OpenAI-format client, Anthropic upstream)
    * :func:`openai_to_anthropic_request` turns a ``/v1/chat/completions`` body into a ``/v1/messages``
      body and returns a :class:`TranslationContext` alongside it.  The context carries what the
      response side needs to know about the request (today: the name of the forced tool that
      emulates ``response_format: json_schema``, and whether the client asked for a usage chunk).
    * :func:`anthropic_to_openai_response` turns a Messages response into a ``chat.completion``.
    * :class:`AnthropicToOpenAIStream` turns parsed Anthropic SSE event payloads into
      ``chat.completion.chunk`` dicts.

Reverse direction (Anthropic-format client, OpenAI upstream)
    * :func:`anthropic_to_openai_request`, :func:`openai_to_anthropic_response` and
      :class:`OpenAIToAnthropicStream` (which yields ``(event_type, data)`` tuples).

Problems that are the *client's* fault (unsupported features, malformed tool arguments, ``n > 1``)
raise :class:`TranslationError`, a :class:`ValueError` the gateway should map to HTTP 400.  An
``error`` event inside an upstream stream raises :class:`UpstreamStreamError`.

Lossy corners, by design:
    * OpenAI-only sampling knobs Anthropic rejects (``presence_penalty``, ``frequency_penalty``,
      ``logit_bias``, ``logprobs``, ``seed``, ``stream_options``, ``service_tier``, ``store``,
      ``metadata``, ``reasoning_effort``, ...) are dropped; only known fields are emitted.
    * OpenAI accepts ``temperature`` up to 2, Anthropic up to 1: values are clamped to 1.
    * ``system``/``developer`` messages anywhere in the conversation are hoisted into the top-level
      Anthropic ``system`` prompt.
    * Anthropic ``thinking`` blocks are not surfaced to OpenAI clients (and vice versa).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = [
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "TranslationContext",
    "TranslationError",
    "UpstreamStreamError",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
]

JSON = dict[str, Any]

DEFAULT_JSON_TOOL_NAME: Final = "json_response"
JSON_OBJECT_INSTRUCTION: Final = (
    "Respond only with a single valid JSON object. Do not include any text, explanation or "
    "markdown code fences outside of the JSON object."
)
_JSON_TOOL_DESCRIPTION: Final = (
    "Respond to the user by calling this tool. Its input is your final answer and must match the schema."
)

# Anthropic stop_reason -> OpenAI finish_reason
_FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# OpenAI finish_reason -> Anthropic stop_reason
_STOP_REASONS: Final[dict[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class TranslationError(ValueError):
    """A payload cannot be expressed in the target wire format.

    Raised for client-side problems (unsupported features, malformed tool-call arguments, ``n > 1``
    ...). Gateways should surface it as an HTTP 400 ``invalid_request_error``.
    """


class UpstreamStreamError(RuntimeError):
    """The upstream reported an error in the middle of a stream (an ``error`` SSE event/chunk).

    Attributes:
        message: the upstream's human readable message.
        error_type: the upstream error type (e.g. ``"overloaded_error"``) if it sent one.
        payload: the raw event data.
    """

    def __init__(self, message: str, error_type: str | None = None, payload: JSON | None = None) -> None:
        super().__init__(f"{error_type}: {message}" if error_type else message)
        self.message = message
        self.error_type = error_type
        self.payload = payload or {}


@dataclass(frozen=True, slots=True)
class TranslationContext:
    """Request-side facts the response translation needs, returned by :func:`openai_to_anthropic_request`.

    Attributes:
        json_tool_name: name of the synthetic tool forced to emulate ``response_format: json_schema``.
            A ``tool_use`` of this tool in the response is turned back into plain message ``content``
            (a JSON string) with ``finish_reason="stop"``. ``None`` when no such tool was added.
        include_usage: the client asked for ``stream_options.include_usage``; pass it on to
            :class:`AnthropicToOpenAIStream`.
        stream: the client asked for a streaming response.
    """

    json_tool_name: str | None = None
    include_usage: bool = False
    stream: bool = False


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    """Compact JSON text (no whitespace), as OpenAI uses for tool-call arguments."""
    return orjson.dumps(value).decode()


def _parse_arguments(arguments: Any, where: str) -> JSON:
    """Parse OpenAI tool-call ``arguments`` (a JSON string) into an Anthropic ``input`` object."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise TranslationError(f"{where}: tool call arguments must be a JSON string")
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise TranslationError(
            f"{where}: tool call arguments are not valid JSON ({exc}): {arguments!r}"
        ) from exc
    if not isinstance(parsed, dict):
        raise TranslationError(
            f"{where}: tool call arguments must be a JSON object, got {type(parsed).__name__}"
        )
    return parsed


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    """Split ``data:<media type>;base64,<data>`` into ``(media_type, data)``."""
    header, sep, data = url[len("data:") :].partition(",")
    meta = header.split(";")
    if not sep or not meta[0] or "base64" not in meta[1:]:
        raise TranslationError(f"{where}: only base64 data URLs ('data:<type>;base64,...') are supported")
    return meta[0], data


def _with_cache_control(block: JSON, source: JSON) -> JSON:
    """Carry a prompt-caching ``cache_control`` marker over from an OpenAI-format part, if present."""
    if isinstance(source, dict) and source.get("cache_control"):
        block["cache_control"] = source["cache_control"]
    return block


def _openai_usage(usage: JSON | None) -> JSON:
    """Anthropic ``usage`` -> OpenAI ``usage`` (cache reads/writes count as prompt tokens)."""
    usage = usage or {}
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_creation = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cache_read + cache_creation
    completion = int(usage.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def _anthropic_usage(usage: JSON | None) -> JSON:
    """OpenAI ``usage`` -> Anthropic ``usage`` (cached prompt tokens become cache reads)."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _finish_reason(stop_reason: str | None, json_answer: bool = False) -> str:
    if stop_reason == "tool_use" and json_answer:
        return "stop"
    return _FINISH_REASONS.get(stop_reason or "", "stop")


# ---------------------------------------------------------------------------------------------------
# OpenAI request -> Anthropic request
# ---------------------------------------------------------------------------------------------------


def _text_of_parts(content: Any, where: str, allowed: tuple[str, ...] = ("text",)) -> list[JSON]:
    """OpenAI text-only content (string or text parts) -> Anthropic text blocks (empty text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of content parts")
    blocks: list[JSON] = []
    for i, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype not in allowed:
            raise TranslationError(f"{where}.content[{i}]: unsupported content part type {ptype!r} here")
        text = part.get("text") if ptype == "text" else part.get("refusal")
        if text:
            blocks.append(_with_cache_control({"type": "text", "text": text}, part))
    return blocks


def _image_block(part: JSON, where: str) -> JSON:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise TranslationError(f"{where}: image_url.url is required")
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url, where)
        source: JSON = {"type": "base64", "media_type": media_type, "data": data}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise TranslationError(f"{where}: image URLs must be http(s) or base64 data URLs")
    return _with_cache_control({"type": "image", "source": source}, part)


def _file_block(part: JSON, where: str) -> JSON:
    file = part.get("file") or {}
    file_data = file.get("file_data")
    if not isinstance(file_data, str) or not file_data.startswith("data:"):
        raise TranslationError(
            f"{where}: only inline files (file.file_data as a base64 data URL) are supported"
        )
    media_type, data = _parse_data_url(file_data, where)
    if media_type != "application/pdf":
        raise TranslationError(f"{where}: unsupported file type {media_type!r} (only application/pdf)")
    block: JSON = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return _with_cache_control(block, part)


def _user_blocks(content: Any, where: str) -> list[JSON]:
    if content is None or isinstance(content, str):
        return _text_of_parts(content, where)
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of content parts")
    blocks: list[JSON] = []
    for i, part in enumerate(content):
        pwhere = f"{where}.content[{i}]"
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype == "text":
            blocks.extend(_text_of_parts([part], where))
        elif ptype == "image_url":
            blocks.append(_image_block(part, pwhere))
        elif ptype == "file":
            blocks.append(_file_block(part, pwhere))
        else:
            raise TranslationError(f"{pwhere}: content part type {ptype!r} is not supported by Anthropic")
    return blocks


def _assistant_blocks(msg: JSON, where: str) -> list[JSON]:
    blocks = _text_of_parts(msg.get("content"), where, allowed=("text", "refusal"))
    if msg.get("function_call"):
        raise TranslationError(f"{where}: legacy 'function_call' is not supported; use 'tool_calls'")
    for j, call in enumerate(msg.get("tool_calls") or []):
        cwhere = f"{where}.tool_calls[{j}]"
        if call.get("type", "function") != "function":
            raise TranslationError(f"{cwhere}: tool call type {call.get('type')!r} is not supported")
        fn = call.get("function") or {}
        if not fn.get("name"):
            raise TranslationError(f"{cwhere}: function.name is required")
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _new_id("toolu_"),
                "name": fn["name"],
                "input": _parse_arguments(fn.get("arguments"), cwhere),
            }
        )
    return blocks


def _tool_result_block(msg: JSON, where: str) -> JSON:
    tool_call_id = msg.get("tool_call_id")
    if not tool_call_id:
        raise TranslationError(f"{where}: tool messages require 'tool_call_id'")
    block: JSON = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        parts = _text_of_parts(content, where)
        if parts:
            block["content"] = parts
    return block


def _append_turn(turns: list[JSON], role: str, blocks: list[JSON]) -> None:
    """Append blocks, merging into the previous turn when it has the same role (Anthropic alternation)."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def _finalize_turns(turns: list[JSON]) -> list[JSON]:
    for turn in turns:
        blocks: list[JSON] = turn["content"]
        if turn["role"] == "user":
            # tool_result blocks must open the user turn that answers a tool_use turn
            blocks.sort(key=lambda b: b.get("type") != "tool_result")
    if turns and turns[-1]["role"] == "assistant":
        # a trailing assistant turn is a prefill; Anthropic rejects trailing whitespace there
        last = turns[-1]["content"]
        if last and last[-1].get("type") == "text":
            stripped = last[-1]["text"].rstrip()
            if stripped:
                last[-1]["text"] = stripped
            else:
                last.pop()
        if not last:
            turns.pop()
    for turn in turns:
        blocks = turn["content"]
        if len(blocks) == 1 and blocks[0].get("type") == "text" and set(blocks[0]) == {"type", "text"}:
            turn["content"] = blocks[0]["text"]
    return turns


def _convert_openai_messages(messages: Any) -> tuple[list[JSON], list[JSON]]:
    """Return ``(system_blocks, anthropic_messages)``."""
    if not isinstance(messages, list) or not messages:
        raise TranslationError("'messages' must be a non-empty list")
    system: list[JSON] = []
    turns: list[JSON] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise TranslationError(f"{where}: must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(_text_of_parts(msg.get("content"), where))
        elif role == "user":
            _append_turn(turns, "user", _user_blocks(msg.get("content"), where))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(msg, where))
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result_block(msg, where)])
        elif role == "function":
            raise TranslationError(f"{where}: legacy 'function' messages are not supported; use 'tool'")
        else:
            raise TranslationError(f"{where}: unsupported role {role!r}")
    turns = _finalize_turns(turns)
    if not turns:
        raise TranslationError("at least one non-empty user or assistant message is required")
    return system, turns


def _convert_openai_tools(tools: Any) -> list[JSON]:
    if not tools:
        return []
    if not isinstance(tools, list):
        raise TranslationError("'tools' must be a list")
    out: list[JSON] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise TranslationError(f"{where}: only 'function' tools are supported, got {kind!r}")
        fn = tool.get("function") or {}
        name = fn.get("name")
        if not name:
            raise TranslationError(f"{where}: function.name is required")
        schema = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        schema.setdefault("type", "object")
        converted: JSON = {"name": name}
        if fn.get("description"):
            converted["description"] = fn["description"]
        converted["input_schema"] = schema
        out.append(_with_cache_control(converted, tool))
    return out


def _convert_openai_tool_choice(choice: Any) -> JSON | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mapped = {"auto": "auto", "required": "any", "none": "none"}.get(choice)
        if mapped is None:
            raise TranslationError(f"unsupported tool_choice {choice!r}")
        return {"type": mapped}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not name:
            raise TranslationError("tool_choice.function.name is required")
        return {"type": "tool", "name": name}
    raise TranslationError(f"unsupported tool_choice {choice!r}")


def _json_schema_tool(response_format: JSON) -> JSON:
    spec = response_format.get("json_schema") or {}
    name = spec.get("name") or DEFAULT_JSON_TOOL_NAME
    schema = spec.get("schema") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise TranslationError("response_format.json_schema.schema must describe a JSON object")
    return {
        "name": name,
        "description": spec.get("description") or _JSON_TOOL_DESCRIPTION,
        "input_schema": {"type": "object", **schema},
    }


def openai_to_anthropic_request(
    body: JSON, upstream_model: str, default_max_tokens: int = 4096
) -> tuple[JSON, TranslationContext]:
    """Translate an OpenAI ``/v1/chat/completions`` request body into an Anthropic ``/v1/messages`` body.

    Args:
        body: the OpenAI request (already parsed JSON).
        upstream_model: Anthropic model id to put in ``model``.
        default_max_tokens: used when the client sets neither ``max_completion_tokens`` nor
            ``max_tokens`` (Anthropic requires one).

    Returns:
        ``(anthropic_body, ctx)``. Keep ``ctx`` and pass it to :func:`anthropic_to_openai_response` or
        :class:`AnthropicToOpenAIStream`; it tells them e.g. which forced tool emulates
        ``response_format: json_schema``.

    Raises:
        TranslationError: the request uses something Anthropic cannot express (``n > 1``, audio,
            legacy ``functions``, non-function tools, malformed tool-call arguments, ...).
    """
    if not isinstance(body, dict):
        raise TranslationError("request body must be a JSON object")
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError(f"n={n} is not supported by Anthropic models (only n=1)")
    if body.get("functions") or body.get("function_call"):
        raise TranslationError(
            "legacy 'functions'/'function_call' are not supported; use 'tools'/'tool_choice'"
        )
    if "audio" in (body.get("modalities") or []) or body.get("audio"):
        raise TranslationError("audio output is not supported by Anthropic models")

    system, messages = _convert_openai_messages(body.get("messages"))

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise TranslationError(f"max_tokens must be a positive integer, got {max_tokens!r}")

    out: JSON = {"model": upstream_model, "max_tokens": max_tokens, "messages": messages}

    tools = _convert_openai_tools(body.get("tools"))
    tool_choice = _convert_openai_tool_choice(body.get("tool_choice"))
    json_tool_name: str | None = None

    response_format = body.get("response_format")
    rf_type = response_format.get("type") if isinstance(response_format, dict) else response_format
    if rf_type == "json_object":
        system.append({"type": "text", "text": JSON_OBJECT_INSTRUCTION})
    elif rf_type == "json_schema":
        assert isinstance(response_format, dict)
        json_tool = _json_schema_tool(response_format)
        json_tool_name = json_tool["name"]
        if any(t["name"] == json_tool_name for t in tools):
            raise TranslationError(
                f"response_format.json_schema.name {json_tool_name!r} collides with a tool of the same name"
            )
        if not tools or (tool_choice is not None and tool_choice["type"] == "none"):
            # nothing else may be called: force the answer through the schema tool
            tool_choice = {"type": "tool", "name": json_tool_name}
        elif tool_choice is None or tool_choice["type"] in ("auto", "any"):
            # the model may call a real tool or answer via the schema tool, but must call one of them
            tool_choice = {"type": "any"}
        tools = [*tools, json_tool]
    elif rf_type not in (None, "text"):
        raise TranslationError(f"unsupported response_format type {rf_type!r}")

    if system:
        if any("cache_control" in block for block in system):
            out["system"] = system
        else:
            out["system"] = "\n\n".join(block["text"] for block in system)

    if tools:
        out["tools"] = tools
        if body.get("parallel_tool_calls") is False:
            tool_choice = tool_choice or {"type": "auto"}
            if tool_choice["type"] != "none":
                tool_choice = {**tool_choice, "disable_parallel_tool_use": True}
        if tool_choice is not None:
            out["tool_choice"] = tool_choice

    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TranslationError(f"temperature must be a number, got {temperature!r}")
        out["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("top_k") is not None:  # not OpenAI, but commonly sent as an extra by SDK users
        out["top_k"] = body["top_k"]

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list):
        sequences = [s for s in stop if isinstance(s, str) and s]
        if sequences:
            out["stop_sequences"] = sequences

    if "stream" in body and body["stream"] is not None:
        out["stream"] = bool(body["stream"])

    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}

    stream_options = body.get("stream_options") or {}
    ctx = TranslationContext(
        json_tool_name=json_tool_name,
        include_usage=bool(stream_options.get("include_usage")),
        stream=bool(body.get("stream")),
    )
    return out, ctx


# ---------------------------------------------------------------------------------------------------
# Anthropic response -> OpenAI response
# ---------------------------------------------------------------------------------------------------


def _chatcmpl_id(message_id: str | None) -> str:
    if not message_id:
        return _new_id("chatcmpl-")
    return message_id if message_id.startswith("chatcmpl-") else f"chatcmpl-{message_id}"


def anthropic_to_openai_response(
    resp: JSON, requested_model: str, ctx: TranslationContext | None = None, *, created: int | None = None
) -> JSON:
    """Translate an Anthropic Messages response into an OpenAI ``chat.completion`` object.

    Text blocks are joined into ``message.content`` (``None`` if there is no text), ``tool_use``
    blocks become ``message.tool_calls`` with compact-JSON ``arguments``. If ``ctx.json_tool_name``
    is set, a ``tool_use`` of that tool becomes the message content (a JSON string) and the finish
    reason becomes ``"stop"``. ``thinking`` and server-tool blocks are dropped.

    Args:
        resp: Anthropic response body.
        requested_model: model name to report back (what the client asked for).
        ctx: the context returned by :func:`openai_to_anthropic_request`.
        created: unix timestamp for ``created`` (defaults to now).
    """
    json_tool = ctx.json_tool_name if ctx else None
    texts: list[str] = []
    tool_calls: list[JSON] = []
    json_content: str | None = None
    for block in resp.get("content") or []:
        btype = block.get("type")
        if btype == "text":
            texts.append(block.get("text") or "")
        elif btype == "tool_use":
            tool_input = block.get("input") or {}
            if json_tool is not None and block.get("name") == json_tool and json_content is None:
                json_content = _dumps(tool_input)
            else:
                tool_calls.append(
                    {
                        "id": block.get("id") or _new_id("call_"),
                        "type": "function",
                        "function": {"name": block.get("name", ""), "arguments": _dumps(tool_input)},
                    }
                )
    if json_content is not None:
        content: str | None = json_content  # preamble text around a structured answer is dropped
    else:
        content = "".join(texts) if texts else None

    message: JSON = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = _finish_reason(resp.get("stop_reason"), json_answer=json_content is not None and not tool_calls)
    return {
        "id": _chatcmpl_id(resp.get("id")),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": requested_model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _openai_usage(resp.get("usage")),
        "system_fingerprint": None,
    }


# ---------------------------------------------------------------------------------------------------
# Anthropic stream -> OpenAI stream
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _StreamBlock:
    kind: str  # "text" | "tool" | "json" | "ignored"
    tool_index: int = -1
    initial_input: JSON = field(default_factory=dict)
    emitted: bool = False


class AnthropicToOpenAIStream:
    """Stateful translator: Anthropic SSE event payloads -> OpenAI ``chat.completion.chunk`` dicts.

    Feed every parsed ``data:`` payload of the upstream stream, in order, to :meth:`feed` and send
    the returned chunks to the client. After ``message_stop`` the accumulated :attr:`text`,
    :attr:`tool_calls`, :attr:`finish_reason` and :attr:`usage` describe the whole response (useful
    for tracing and cost accounting).

    Tool calls get a running OpenAI ``index``: the first delta carries ``index``, ``id``,
    ``type="function"`` and ``function={"name", "arguments": ""}``; later deltas carry ``index`` and
    an ``arguments`` fragment. ``thinking`` deltas are skipped.
    """

    def __init__(
        self,
        requested_model: str,
        ctx: TranslationContext | None = None,
        include_usage: bool = True,
        *,
        created: int | None = None,
    ) -> None:
        """Create a translator.

        Args:
            requested_model: model name reported in every chunk.
            ctx: the context returned by :func:`openai_to_anthropic_request`.
            include_usage: emit the final ``choices: []`` usage chunk on ``message_stop``
                (OpenAI ``stream_options.include_usage``); when set, other chunks carry ``usage: null``.
            created: unix timestamp for ``created`` (defaults to now).
        """
        self.model = requested_model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self.id = _new_id("chatcmpl-")
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.done = False
        self._json_tool = ctx.json_tool_name if ctx else None
        self._started = False
        self._finish_sent = False
        self._text_parts: list[str] = []
        self._tool_calls: list[JSON] = []
        self._blocks: dict[int, _StreamBlock] = {}
        self._json_answer = False
        self._usage: JSON = {}

    # -- accumulated state ---------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All message content streamed so far (including a ``json_schema`` answer)."""
        return "".join(self._text_parts)

    @property
    def tool_calls(self) -> list[JSON]:
        """Tool calls streamed so far, as complete OpenAI ``tool_calls`` entries."""
        return [{**c, "function": dict(c["function"])} for c in self._tool_calls]

    @property
    def usage(self) -> JSON:
        """OpenAI-style usage (``prompt_tokens``, ``completion_tokens``, ``total_tokens``, cached tokens)."""
        return _openai_usage(self._usage)

    # -- translation ---------------------------------------------------------------------------------

    def _chunk(self, delta: JSON, finish_reason: str | None = None) -> JSON:
        chunk: JSON = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _start(self, message: JSON | None = None) -> list[JSON]:
        if self._started:
            return []
        self._started = True
        if message:
            if message.get("id"):
                self.id = _chatcmpl_id(message["id"])
            self._merge_usage(message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _merge_usage(self, usage: JSON | None) -> None:
        for key, value in (usage or {}).items():
            if value is not None and key in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            ):
                self._usage[key] = value

    def _content(self, text: str) -> list[JSON]:
        if not text:
            return []
        self._text_parts.append(text)
        return [self._chunk({"content": text})]

    def _arguments(self, block: _StreamBlock, fragment: str) -> list[JSON]:
        if not fragment:
            return []
        block.emitted = True
        if block.kind == "json":
            return self._content(fragment)
        call = self._tool_calls[block.tool_index]
        call["function"]["arguments"] += fragment
        return [
            self._chunk({"tool_calls": [{"index": block.tool_index, "function": {"arguments": fragment}}]})
        ]

    def _block_start(self, index: int, cb: JSON) -> list[JSON]:
        btype = cb.get("type")
        if btype == "text":
            self._blocks[index] = _StreamBlock("text")
            return self._content(cb.get("text") or "")
        if btype != "tool_use":
            self._blocks[index] = _StreamBlock("ignored")  # thinking, server tools, ...
            return []
        initial = cb.get("input") or {}
        if self._json_tool is not None and cb.get("name") == self._json_tool and not self._json_answer:
            self._json_answer = True
            self._blocks[index] = _StreamBlock("json", initial_input=initial)
            return []
        tool_index = len(self._tool_calls)
        self._blocks[index] = _StreamBlock("tool", tool_index=tool_index, initial_input=initial)
        call: JSON = {
            "id": cb.get("id") or _new_id("call_"),
            "type": "function",
            "function": {"name": cb.get("name", ""), "arguments": ""},
        }
        self._tool_calls.append(call)
        first = {"index": tool_index, **call, "function": dict(call["function"])}
        return [self._chunk({"tool_calls": [first]})]

    def _block_delta(self, index: int, delta: JSON) -> list[JSON]:
        block = self._blocks.get(index)
        dtype = delta.get("type")
        if dtype == "text_delta":
            if block is not None and block.kind == "ignored":
                return []
            return self._content(delta.get("text") or "")
        if dtype == "input_json_delta" and block is not None and block.kind in ("tool", "json"):
            return self._arguments(block, delta.get("partial_json") or "")
        return []  # thinking_delta, signature_delta, citations_delta, ...

    def _block_stop(self, index: int) -> list[JSON]:
        block = self._blocks.get(index)
        if block is None or block.kind not in ("tool", "json") or block.emitted:
            return []
        # no input_json_delta arrived (e.g. a tool without parameters): arguments must still be JSON
        return self._arguments(block, _dumps(block.initial_input))

    def _finish(self) -> list[JSON]:
        if self._finish_sent:
            return []
        self._finish_sent = True
        only_json = self._json_answer and not self._tool_calls
        self.finish_reason = _finish_reason(self.stop_reason, json_answer=only_json)
        return [self._chunk({}, self.finish_reason)]

    def feed(self, event: JSON) -> list[JSON]:
        """Translate one parsed Anthropic stream event into zero or more OpenAI chunks.

        Raises:
            UpstreamStreamError: for an ``error`` event.
        """
        etype = event.get("type")
        if etype == "error":
            err = event.get("error") or {}
            raise UpstreamStreamError(
                err.get("message") or "upstream stream error", err.get("type"), payload=event
            )
        if etype in ("ping", None) or self.done:
            return []
        if etype == "message_start":
            return self._start(event.get("message") or {})
        chunks = self._start()
        if etype == "content_block_start":
            chunks += self._block_start(int(event.get("index", 0)), event.get("content_block") or {})
        elif etype == "content_block_delta":
            chunks += self._block_delta(int(event.get("index", 0)), event.get("delta") or {})
        elif etype == "content_block_stop":
            chunks += self._block_stop(int(event.get("index", 0)))
        elif etype == "message_delta":
            self._merge_usage(event.get("usage"))
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
            chunks += self._finish()
        elif etype == "message_stop":
            chunks += self._finish()
            self.done = True
            if self.include_usage:
                chunks.append(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage,
                    }
                )
        return chunks


# ---------------------------------------------------------------------------------------------------
# Anthropic request -> OpenAI request (Anthropic-compatible ingress)
# ---------------------------------------------------------------------------------------------------


def _anthropic_text(content: Any, where: str) -> str:
    """Anthropic string-or-text-blocks -> plain string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else None
            raise TranslationError(f"{where}[{i}]: expected a text block, got {kind!r}")
        parts.append(block.get("text") or "")
    return "\n\n".join(parts)


def _openai_image_part(block: JSON, where: str) -> JSON:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = str(source.get("url") or "")
    else:
        raise TranslationError(f"{where}: image source type {source.get('type')!r} is not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _openai_document_part(block: JSON, where: str) -> JSON:
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") == "application/pdf":
        return {
            "type": "file",
            "file": {
                "filename": block.get("title") or "document.pdf",
                "file_data": f"data:application/pdf;base64,{source.get('data')}",
            },
        }
    if source.get("type") == "text":
        return {"type": "text", "text": source.get("data") or ""}
    raise TranslationError(f"{where}: only base64 PDF or plain-text documents are supported")


def _user_parts_content(parts: list[JSON]) -> str | list[JSON]:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def _convert_anthropic_user(content: Any, where: str) -> list[JSON]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of blocks")
    tool_messages: list[JSON] = []
    parts: list[JSON] = []
    for i, block in enumerate(content):
        bwhere = f"{where}.content[{i}]"
        btype = block.get("type") if isinstance(block, dict) else None
        if btype == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif btype == "image":
            parts.append(_openai_image_part(block, bwhere))
        elif btype == "document":
            parts.append(_openai_document_part(block, bwhere))
        elif btype == "tool_result":
            result = block.get("content")
            texts: list[str] = []
            if isinstance(result, str):
                texts.append(result)
            elif isinstance(result, list):
                for j, item in enumerate(result):
                    itype = item.get("type") if isinstance(item, dict) else None
                    if itype == "text":
                        texts.append(item.get("text") or "")
                    elif itype == "image":
                        # OpenAI tool messages are text-only: show the image in the following user turn
                        parts.append(_openai_image_part(item, f"{bwhere}.content[{j}]"))
                    else:
                        raise TranslationError(
                            f"{bwhere}.content[{j}]: unsupported tool_result block {itype!r}"
                        )
            text = "\n\n".join(texts)
            if block.get("is_error"):
                text = f"Error: {text}" if text else "Error"
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            raise TranslationError(f"{bwhere}: block type {btype!r} is not supported in user messages")
    messages = tool_messages
    if parts:
        messages.append({"role": "user", "content": _user_parts_content(parts)})
    return messages


def _convert_anthropic_assistant(content: Any, where: str) -> JSON:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of blocks")
    texts: list[str] = []
    tool_calls: list[JSON] = []
    for i, block in enumerate(content):
        btype = block.get("type") if isinstance(block, dict) else None
        if btype == "text":
            texts.append(block.get("text") or "")
        elif btype == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id") or _new_id("call_"),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": _dumps(block.get("input") or {}),
                    },
                }
            )
        elif btype in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(f"{where}.content[{i}]: block type {btype!r} is not supported")
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _convert_anthropic_tools(tools: Any) -> list[JSON]:
    out: list[JSON] = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise TranslationError(
                f"tools[{i}]: server/builtin tool {kind!r} is not supported by OpenAI upstreams"
            )
        fn: JSON = {"name": tool.get("name")}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def anthropic_to_openai_request(body: JSON) -> JSON:
    """Translate an Anthropic ``/v1/messages`` request body into an OpenAI ``/v1/chat/completions`` body.

    ``system`` becomes a leading system message; ``tool_result`` blocks become ``tool`` messages
    (placed before the rest of their user turn); ``tool_use`` blocks become assistant
    ``tool_calls``; ``thinking`` blocks, ``top_k``, ``thinking`` and other Anthropic-only options
    are dropped. ``model`` is copied through for the caller to rewrite. Streaming requests ask
    for ``stream_options.include_usage`` so the final Anthropic ``message_delta`` can carry usage.

    Raises:
        TranslationError: for content the OpenAI format cannot carry (server tools, non-PDF documents...).
    """
    if not isinstance(body, dict):
        raise TranslationError("request body must be a JSON object")
    messages: list[JSON] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _anthropic_text(system, "system")})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise TranslationError("'messages' must be a non-empty list")
    for i, msg in enumerate(raw_messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "user":
            messages.extend(_convert_anthropic_user(msg.get("content"), where))
        elif role == "assistant":
            messages.append(_convert_anthropic_assistant(msg.get("content"), where))
        else:
            raise TranslationError(f"{where}: unsupported role {role!r}")

    out: JSON = {"model": body.get("model"), "messages": messages}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])

    tools = _convert_anthropic_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            ctype = choice.get("type")
            if ctype == "auto":
                out["tool_choice"] = "auto"
            elif ctype == "any":
                out["tool_choice"] = "required"
            elif ctype == "none":
                out["tool_choice"] = "none"
            elif ctype == "tool":
                out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
            else:
                raise TranslationError(f"unsupported tool_choice type {ctype!r}")
            if choice.get("disable_parallel_tool_use") and ctype != "none":
                out["parallel_tool_calls"] = False

    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id:
        out["user"] = user_id
    return out


# ---------------------------------------------------------------------------------------------------
# OpenAI response -> Anthropic response
# ---------------------------------------------------------------------------------------------------


def _message_id(openai_id: str | None) -> str:
    if not openai_id:
        return _new_id("msg_")
    return openai_id if openai_id.startswith("msg_") else f"msg_{openai_id}"


def openai_to_anthropic_response(resp: JSON, requested_model: str) -> JSON:
    """Translate an OpenAI ``chat.completion`` into an Anthropic ``message`` object.

    The first choice is used. ``content`` (and a ``refusal``) become text blocks, ``tool_calls``
    become ``tool_use`` blocks; ``finish_reason`` maps stop→end_turn, length→max_tokens,
    tool_calls→tool_use, content_filter→refusal. Cached prompt tokens are reported as
    ``cache_read_input_tokens`` and excluded from ``input_tokens``.

    Raises:
        TranslationError: a tool call's ``arguments`` are not a JSON object.
    """
    choices = resp.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[JSON] = []
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if refusal:
        content.append({"type": "text", "text": refusal})
    for j, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or _new_id("toolu_"),
                "name": fn.get("name", ""),
                "input": _parse_arguments(fn.get("arguments"), f"choices[0].message.tool_calls[{j}]"),
            }
        )
    stop_reason = _STOP_REASONS.get(choice.get("finish_reason") or "", "end_turn")
    if refusal and not text and not message.get("tool_calls"):
        stop_reason = "refusal"
    return {
        "id": _message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(resp.get("usage")),
    }


# ---------------------------------------------------------------------------------------------------
# OpenAI stream -> Anthropic stream
# ---------------------------------------------------------------------------------------------------


class OpenAIToAnthropicStream:
    """Stateful translator: OpenAI ``chat.completion.chunk`` dicts -> Anthropic stream events.

    :meth:`feed` and :meth:`finish` return ``(event_type, data)`` tuples to be written as
    ``event: <event_type>\\ndata: <json>\\n\\n``. Together they always form a valid Anthropic event
    sequence: ``message_start``; for each text run / tool call a ``content_block_start``, its
    ``content_block_delta`` events (``text_delta`` / ``input_json_delta``) and ``content_block_stop``;
    then ``message_delta`` (stop_reason + usage) and ``message_stop``.

    The closing events are emitted when the usage-only chunk that OpenAI sends last (with
    ``stream_options.include_usage``) arrives, or otherwise by :meth:`finish`, which must be called
    when the upstream stream ends (it is idempotent).
    """

    def __init__(self, requested_model: str, *, message_id: str | None = None) -> None:
        """Create a translator reporting ``requested_model``; ``message_id`` defaults to the upstream id."""
        self.model = requested_model
        self.id = message_id
        self.stop_reason: str | None = None
        self.done = False
        self._started = False
        self._next_block = 0
        self._open: tuple[str, int] | None = None  # ("text", block) or ("tool", openai tool index)
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._text_parts: list[str] = []
        self._tool_calls: dict[int, JSON] = {}
        self._usage: JSON | None = None
        self._refused = False

    @property
    def text(self) -> str:
        """Text streamed so far."""
        return "".join(self._text_parts)

    @property
    def usage(self) -> JSON:
        """Anthropic-style usage (all zeros until the upstream reports usage)."""
        return _anthropic_usage(self._usage)

    @property
    def tool_calls(self) -> list[JSON]:
        """Tool calls streamed so far as ``{"id", "name", "arguments"}`` (arguments is raw JSON text)."""
        return [dict(self._tool_calls[k]) for k in sorted(self._tool_calls)]

    def _start(self, chunk: JSON | None = None) -> list[tuple[str, JSON]]:
        if self._started:
            return []
        self._started = True
        if self.id is None:
            self.id = _message_id((chunk or {}).get("id"))
        message: JSON = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[tuple[str, JSON]]:
        if self._open is None:
            return []
        kind, key = self._open
        index = key if kind == "text" else self._tool_blocks[key]
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _text(self, text: str) -> list[tuple[str, JSON]]:
        events: list[tuple[str, JSON]] = []
        if self._open is None or self._open[0] != "text":
            events += self._close()
            index = self._next_block
            self._next_block += 1
            self._open = ("text", index)
            block: JSON = {"type": "text", "text": ""}
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            )
        self._text_parts.append(text)
        delta = {"type": "text_delta", "text": text}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": self._open[1], "delta": delta})
        )
        return events

    def _tool(self, call: JSON, position: int) -> list[tuple[str, JSON]]:
        events: list[tuple[str, JSON]] = []
        tool_index = call.get("index")
        if not isinstance(tool_index, int):
            tool_index = position
        fn = call.get("function") or {}
        if tool_index not in self._tool_blocks:
            events += self._close()
            index = self._next_block
            self._next_block += 1
            self._tool_blocks[tool_index] = index
            self._open = ("tool", tool_index)
            tool_id = call.get("id") or _new_id("toolu_")
            self._tool_calls[tool_index] = {"id": tool_id, "name": fn.get("name") or "", "arguments": ""}
            block: JSON = {"type": "tool_use", "id": tool_id, "name": fn.get("name") or "", "input": {}}
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            )
        elif self._open != ("tool", tool_index):
            if not fn.get("arguments"):
                return events
            raise TranslationError(
                f"tool call {tool_index} received arguments after its content block was closed "
                "(interleaved tool-call deltas cannot be expressed as Anthropic events)"
            )
        arguments = fn.get("arguments")
        if arguments:
            self._tool_calls[tool_index]["arguments"] += arguments
            delta = {"type": "input_json_delta", "partial_json": arguments}
            index = self._tool_blocks[tool_index]
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        return events

    def _closing(self) -> list[tuple[str, JSON]]:
        events = self._start() + self._close()
        self.done = True
        if self.stop_reason is None:
            self.stop_reason = "end_turn"
        usage = self.usage
        delta_usage = {
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
        }
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def feed(self, chunk: JSON) -> list[tuple[str, JSON]]:
        """Translate one OpenAI chunk into zero or more ``(event_type, data)`` Anthropic events.

        Raises:
            UpstreamStreamError: the chunk is an OpenAI in-stream ``{"error": ...}`` payload.
            TranslationError: tool-call argument deltas arrive interleaved between tool calls.
        """
        if chunk.get("error"):
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise UpstreamStreamError(
                err.get("message") or "upstream stream error", err.get("type"), payload=chunk
            )
        if self.done:
            return []
        events = self._start(chunk)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        choices = chunk.get("choices") or []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            if delta.get("refusal"):
                self._refused = True
                events += self._text(delta["refusal"])
            for position, call in enumerate(delta.get("tool_calls") or []):
                events += self._tool(call, position)
            finish = choice.get("finish_reason")
            if finish:
                self.stop_reason = _STOP_REASONS.get(finish, "end_turn")
                if self._refused and finish == "stop":
                    self.stop_reason = "refusal"
                events += self._close()
        if not choices and self._usage is not None and self.stop_reason is not None:
            events += self._closing()  # OpenAI's trailing usage chunk: the stream is complete
        return events

    def finish(self) -> list[tuple[str, JSON]]:
        """Emit whatever closing events (``content_block_stop``, ``message_delta``, ``message_stop``) are missing.

        Call once the upstream stream has ended (``[DONE]``). Safe to call more than once.
        """
        if self.done:
            return []
        return self._closing()
