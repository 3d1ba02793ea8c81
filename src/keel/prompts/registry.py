"""The registry's operations over the store: push (deduplicated), labels, rollback, reads as typed values."""

from __future__ import annotations

from typing import Any

from keel.errors import NotFound
from keel.prompts.model import (
    LabelState,
    Variable,
    Version,
    check_label,
    check_name,
    content_hash,
    normalise,
    normalise_split,
)
from keel.store.prompts import PromptStore

__all__ = ["PromptRegistry", "label_from_dict", "version_from_dict"]


def version_from_dict(d: dict[str, Any]) -> Version:
    return Version(
        name=d["name"],
        version=int(d["version"]),
        type=d["type"],
        template=d["template"],
        variables=tuple(
            Variable(
                v["name"],
                v.get("type", "string"),
                bool(v.get("required", True)),
                v.get("default"),
                v.get("description"),
            )
            for v in d.get("variables") or []
        ),
        config=dict(d.get("config") or {}),
        metadata=dict(d.get("metadata") or {}),
        commit_message=d.get("commit_message"),
        author=d.get("author"),
        created_at=d.get("created_at"),
        content_hash=d.get("content_hash") or "",
    )


def label_from_dict(d: dict[str, Any]) -> LabelState:
    split = tuple((int(x["version"]), float(x["weight"])) for x in d.get("split") or [])
    return LabelState(
        label=d["label"],
        version=int(d["version"]),
        split=split,
        updated_at=d.get("updated_at"),
        updated_by=d.get("updated_by"),
        eval_run=d.get("eval_run"),
    )


class PromptRegistry:
    """Validated writes and typed reads of prompts."""

    def __init__(self, store: PromptStore) -> None:
        self.store = store

    def push(
        self,
        name: Any,
        ptype: Any,
        *,
        template: Any = None,
        messages: Any = None,
        variables: Any = None,
        config: Any = None,
        metadata: Any = None,
        commit_message: str | None = None,
        author: str | None = None,
        labels: list[str] | None = None,
        actor: str | None = None,
    ) -> tuple[Version, bool]:
        """Validate and store a version; an unchanged push creates nothing and returns the newest version."""
        check_name(name)
        for label in labels or ():
            check_label(label)
        ptype, tpl, declared, cfg, meta = normalise(
            ptype, template=template, messages=messages, variables=variables, config=config, metadata=metadata
        )
        digest = content_hash(ptype, tpl, declared, cfg, meta)
        row, created = self.store.push(
            name,
            ptype,
            template=tpl,
            variables=[v.as_dict() for v in declared],
            config=cfg,
            metadata=meta,
            content_hash=digest,
            commit_message=commit_message,
            author=author,
            labels=labels,
            actor=actor,
        )
        return version_from_dict(row), created

    def version(self, name: str, version: int | None = None, label: str | None = None) -> Version:
        """A version by number, by label (its primary version) or the newest one."""
        if version is None:
            prompt = self.store.get_prompt(name)
            if prompt is None:
                raise NotFound(f"prompt '{name}' not found", code="prompt_not_found", param="name")
            if label in (None, "latest"):
                version = int(prompt["latest_version"])
            else:
                found = next((lb for lb in prompt["labels"] if lb["label"] == label), None)
                if found is None:
                    raise NotFound(
                        f"prompt '{name}' has no label '{label}'", code="label_not_found", param="label"
                    )
                version = int(found["version"])
        row = self.store.version(name, version)
        if row is None:
            if self.store.get_prompt(name) is None:
                raise NotFound(f"prompt '{name}' not found", code="prompt_not_found", param="name")
            raise NotFound(
                f"prompt '{name}' has no version {version}", code="version_not_found", param="version"
            )
        return version_from_dict(row)

    def set_label(
        self,
        name: str,
        label: str,
        *,
        version: int | None = None,
        split: Any = None,
        actor: str | None,
        eval_run: str | None = None,
    ) -> LabelState:
        check_label(label)
        parsed = normalise_split(split) if split is not None else None
        if parsed is None and version is None:
            from keel.errors import BadRequest

            raise BadRequest("give 'version' or 'split'", code="invalid_request", param="version")
        row = self.store.set_label(name, label, version=version, split=parsed, actor=actor, eval_run=eval_run)
        return label_from_dict(row)

    def rollback(
        self, name: str, label: str, *, actor: str | None, to_version: int | None = None
    ) -> LabelState:
        check_label(label)
        return label_from_dict(self.store.rollback(name, label, actor=actor, to_version=to_version))
