"""Dataset items: normalisation, import and export (JSONL, CSV, YAML), and items made from traces.

An item is ``{id, input, expected, contexts, metadata}``:

- ``input``: what the prompt is rendered with — an object of template variables, or a string
  (rendered as the variable ``input``);
- ``expected``: the reference output (any JSON value) or null;
- ``contexts``: the context documents (a list of strings; RAG scorers read them);
- ``metadata``: free-form tags;
- ``id``: stable across versions, so runs pair items by it.  When not given it is derived from the
  content, so importing the same file twice adds nothing.

A record without an ``input`` key uses its other fields (minus the reserved ones) as the input;
so a CSV with columns ``question,expected`` gives ``input = {"question": ...}``.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import yaml

__all__ = [
    "FORMATS",
    "DatasetFormatError",
    "dump_items",
    "item_from_trace",
    "normalise_item",
    "normalise_items",
    "output_text",
    "parse_items",
]

FORMATS = ("jsonl", "csv", "yaml")
RESERVED = ("id", "input", "expected", "contexts", "metadata", "source_trace_id")
MAX_ID = 64


class DatasetFormatError(ValueError):
    """An item or a file that cannot be read; the message names the line/row and the field."""


def _content_id(item: Mapping[str, Any]) -> str:
    body = orjson.dumps(
        {k: item.get(k) for k in ("input", "expected", "contexts", "metadata")}, option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(body).hexdigest()[:16]


def normalise_item(raw: Any, where: str = "item") -> dict[str, Any]:
    """Check one item and fill in its id; DatasetFormatError names what is wrong."""
    if not isinstance(raw, Mapping):
        raise DatasetFormatError(f"{where}: an item must be an object, got {type(raw).__name__}")
    if "input" in raw:
        inp = raw["input"]
    else:
        inp = {k: v for k, v in raw.items() if k not in RESERVED}
        if not inp:
            raise DatasetFormatError(f"{where}: an item needs 'input' (or input fields)")
    if inp is None or (not isinstance(inp, str | Mapping | list | int | float)):
        raise DatasetFormatError(f"{where}.input: must be a string or an object")
    contexts = raw.get("contexts") or []
    if isinstance(contexts, str):
        contexts = [contexts]
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise DatasetFormatError(f"{where}.contexts: must be a list of strings")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise DatasetFormatError(f"{where}.metadata: must be an object")
    item: dict[str, Any] = {
        "input": dict(inp) if isinstance(inp, Mapping) else inp,
        "expected": raw.get("expected"),
        "contexts": list(contexts),
        "metadata": dict(metadata),
    }
    iid = raw.get("id")
    if iid is None or iid == "":
        iid = _content_id(item)
    elif not isinstance(iid, str | int) or isinstance(iid, bool) or len(str(iid)) > MAX_ID:
        raise DatasetFormatError(f"{where}.id: must be a string of at most {MAX_ID} characters")
    item["id"] = str(iid)
    trace = raw.get("source_trace_id")
    if trace is not None:
        item["source_trace_id"] = str(trace)[:32]
    return item


def normalise_items(raw: Iterable[Any]) -> list[dict[str, Any]]:
    return [normalise_item(r, f"items[{i}]") for i, r in enumerate(raw)]


def _maybe_json(text: str, field: str, where: str, want: type) -> Any:
    if text == "":
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if want is list:  # a plain string is one context document
            return [text]
        raise DatasetFormatError(f"{where}.{field}: not valid JSON") from None
    return value


def _parse_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise DatasetFormatError("CSV: no header row")
    out: list[dict[str, Any]] = []
    for n, row in enumerate(reader, start=2):
        where = f"row {n}"
        rec: dict[str, Any] = {}
        for k, v in row.items():
            if k is None:
                raise DatasetFormatError(f"{where}: more cells than header columns")
            v = v if v is not None else ""
            if k in ("contexts",):
                rec[k] = _maybe_json(v, k, where, list)
            elif k == "metadata":
                rec[k] = _maybe_json(v, k, where, dict)
            elif k == "input" and v[:1] in ("{", "["):
                rec[k] = _maybe_json(v, k, where, dict)
            else:
                rec[k] = v if (v != "" or k in ("input",)) else None
        out.append(normalise_item(rec, where))
    return out


def parse_items(text: str | bytes, fmt: str) -> list[dict[str, Any]]:
    """Read items from JSONL, CSV or YAML (a list, or a mapping with ``items``)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetFormatError("file is not UTF-8 text") from None
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jsonl", "ndjson", "json"):
        if fmt == "json" or text.lstrip().startswith("["):
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise DatasetFormatError(f"JSON: {exc}") from None
            if isinstance(doc, Mapping) and "items" in doc:
                doc = doc["items"]
            if not isinstance(doc, list):
                raise DatasetFormatError("JSON: expected a list of items")
            return normalise_items(doc)
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise DatasetFormatError(f"line {n}: invalid JSON ({exc})") from None
            out.append(normalise_item(rec, f"line {n}"))
        return out
    if fmt == "csv":
        return _parse_csv(text)
    if fmt in ("yaml", "yml"):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DatasetFormatError(f"YAML: {exc}") from None
        if doc is None:
            return []
        if isinstance(doc, Mapping) and "items" in doc:
            doc = doc["items"]
        if not isinstance(doc, list):
            raise DatasetFormatError("YAML: expected a list of items (or a mapping with 'items')")
        return normalise_items(doc)
    raise DatasetFormatError(f"unknown format {fmt!r} (use one of: {', '.join(FORMATS)})")


def _public(item: Mapping[str, Any]) -> dict[str, Any]:
    out = {"id": item["id"], "input": item.get("input"), "expected": item.get("expected")}
    if item.get("contexts"):
        out["contexts"] = item["contexts"]
    if item.get("metadata"):
        out["metadata"] = item["metadata"]
    if item.get("source_trace_id"):
        out["source_trace_id"] = item["source_trace_id"]
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def dump_items(items: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """Write items as JSONL, CSV or YAML; ``parse_items`` reads the output back to the same items.

    CSV flattens an object input into one column per variable when every input is an object of
    scalars (the usual spreadsheet shape); otherwise the input is one JSON column.
    """
    fmt = fmt.lower()
    rows = [_public(i) for i in items]
    if fmt == "jsonl":
        return "".join(orjson.dumps(r).decode() + "\n" for r in rows)
    if fmt in ("yaml", "yml"):
        return yaml.safe_dump(rows, sort_keys=False, allow_unicode=True)
    if fmt != "csv":
        raise DatasetFormatError(f"unknown format {fmt!r} (use one of: {', '.join(FORMATS)})")
    flat_keys: list[str] = []
    flat = bool(rows)
    for r in rows:
        inp = r["input"]
        if not isinstance(inp, dict) or any(
            isinstance(v, dict | list) or v is None or k in RESERVED for k, v in inp.items()
        ):
            flat = False
            break
        if not all(isinstance(v, str) for v in inp.values()):
            flat = False  # CSV cells read back as strings: keep typed inputs as JSON
            break
        for k in inp:
            if k not in flat_keys:
                flat_keys.append(k)
    header = ["id", *(flat_keys if flat else ["input"]), "expected", "contexts", "metadata"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        inputs = [r["input"].get(k, "") for k in flat_keys] if flat else [_cell(r["input"])]
        expected = r.get("expected")
        w.writerow(
            [
                r["id"],
                *inputs,
                _cell(expected) if not isinstance(expected, str) else expected,
                orjson.dumps(r["contexts"]).decode() if r.get("contexts") else "",
                orjson.dumps(r["metadata"]).decode() if r.get("metadata") else "",
            ]
        )
    return buf.getvalue()


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") in ("text", None)
        )
    return ""


def output_text(output: Any) -> str | None:
    """The assistant text of a stored LLM span output (OpenAI or Anthropic shape, or a stream summary)."""
    if output is None:
        return None
    if isinstance(output, str):
        return output
    if isinstance(output, Mapping):
        choices = output.get("choices")
        if isinstance(choices, list) and choices:
            msg = choices[0].get("message") or {}
            return _message_text(msg.get("content"))
        if output.get("type") == "message" or "stop_reason" in output:
            return _message_text(output.get("content"))
        if "content" in output:
            return _message_text(output.get("content"))
    return None


def item_from_trace(trace: Mapping[str, Any], *, expected_from_output: bool = True) -> dict[str, Any]:
    """An item from a stored trace: its LLM span's messages as input, its reply as expected.

    The input is ``{"messages": [...]}`` (plus ``prompt_variables`` when the call used a registry
    prompt), so a suite can replay it; DatasetFormatError when the trace has no LLM call with a body.
    """
    spans = [s for s in trace.get("spans") or [] if s.get("kind") == "llm" and s.get("input")]
    if not spans:
        raise DatasetFormatError(
            f"trace {trace.get('trace_id')!r} has no LLM call with a stored request body"
        )
    span = spans[-1]
    body = span["input"]
    inp: dict[str, Any] = {}
    if isinstance(body, Mapping):
        if isinstance(body.get("messages"), list):
            inp["messages"] = body["messages"]
        if body.get("system"):
            inp["system"] = body["system"]
        if isinstance(body.get("prompt_variables"), Mapping):
            inp.update(body["prompt_variables"])
        if isinstance(body.get("input"), str | list):
            inp["input"] = body["input"]
    if not inp:
        inp = {"input": body}
    metadata = {"model": span.get("model") or trace.get("model")}
    if trace.get("tags"):
        metadata["tags"] = list(trace["tags"])
    if trace.get("prompt_name"):
        metadata["prompt"] = f"{trace['prompt_name']}@v{trace.get('prompt_version')}"
    raw: dict[str, Any] = {
        "input": inp,
        "expected": output_text(span.get("output")) if expected_from_output else None,
        "metadata": {k: v for k, v in metadata.items() if v is not None},
        "source_trace_id": trace.get("trace_id"),
    }
    return normalise_item(raw, f"trace {trace.get('trace_id')}")
