"""Differences between two versions: a unified diff (CLI, API) and side-by-side rows (UI)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import orjson

from keel.prompts.model import Version

__all__ = ["SideRow", "config_text", "diff_versions", "side_by_side", "template_text"]


def template_text(v: Version) -> str:
    """The template as text: a text prompt as is; a chat prompt one ``[role]`` block per message."""
    if v.type == "text":
        return str(v.template)
    blocks = []
    for m in v.template:
        if "placeholder" in m:
            blocks.append(f"[placeholder: {m['placeholder']}]")
        else:
            blocks.append(f"[{m['role']}]\n{m['content']}")
    return "\n\n".join(blocks)


def config_text(v: Version) -> str:
    """Config and variables, as stable indented JSON."""
    doc: dict[str, Any] = {"config": v.config, "variables": [x.as_dict() for x in v.variables]}
    if v.metadata:
        doc["metadata"] = v.metadata
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def _unified(a: str, b: str, la: str, lb: str) -> str:
    return "".join(
        difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), la, lb, n=3)
    )


def diff_versions(a: Version, b: Version) -> dict[str, Any]:
    """Unified diffs of template and config between two versions (empty strings when equal)."""
    la, lb = f"{a.name} v{a.version}", f"{b.name} v{b.version}"
    return {
        "from": a.version,
        "to": b.version,
        "template": _unified(template_text(a), template_text(b), la, lb),
        "config": _unified(config_text(a), config_text(b), la, lb),
    }


@dataclass(frozen=True, slots=True)
class SideRow:
    """One row of a side-by-side diff; ``kind`` is equal, replace, delete or insert."""

    left: str | None
    right: str | None
    kind: str
    left_no: int | None
    right_no: int | None


def side_by_side(a: str, b: str) -> list[SideRow]:
    """Rows pairing the lines of ``a`` and ``b`` (changed lines side by side, gaps where one has none)."""
    al, bl = a.splitlines(), b.splitlines()
    rows: list[SideRow] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, al, bl, autojunk=False).get_opcodes():
        if op == "equal":
            rows += [
                SideRow(al[i], bl[j], "equal", i + 1, j + 1)
                for i, j in zip(range(i1, i2), range(j1, j2), strict=True)
            ]
            continue
        n = max(i2 - i1, j2 - j1)
        for k in range(n):
            i, j = i1 + k, j1 + k
            left = al[i] if i < i2 else None
            right = bl[j] if j < j2 else None
            kind = (
                "replace"
                if left is not None and right is not None
                else ("delete" if left is not None else "insert")
            )
            rows.append(
                SideRow(
                    left,
                    right,
                    kind,
                    i + 1 if left is not None else None,
                    j + 1 if right is not None else None,
                )
            )
    return rows
