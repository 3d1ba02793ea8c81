"""The gateway's in-memory view of the registry: no database round trip when a request names a prompt.

Loaded at start, reloaded when prompts change (at once in the process that made the change; in the
other replicas through Redis pub/sub on ``<redis_prefix>prompts:changed``) and periodically as a
safety net.  Templates are compiled once per version and reused across reloads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from keel.errors import NotFound
from keel.prompts.model import LabelState
from keel.prompts.registry import label_from_dict, version_from_dict
from keel.prompts.render import CompiledPrompt
from keel.prompts.selection import choose_version
from keel.store.prompts import PromptStore
from keel.store.replicated import ReplicatedCache

__all__ = ["PromptCache", "prompts_channel"]

log = logging.getLogger("keel.prompts")


def prompts_channel(prefix: str = "keel:") -> str:
    """The pub/sub channel that tells replicas to reload prompts."""
    return f"{prefix}prompts:changed"


@dataclass
class _Entry:
    project_id: str | None
    name: str
    type: str
    latest: int
    versions: dict[int, CompiledPrompt] = field(default_factory=dict)
    labels: dict[str, LabelState] = field(default_factory=dict)


class PromptCache(ReplicatedCache):
    """Answers "which compiled version does this request get?" from memory."""

    what = "prompt cache"

    def __init__(
        self,
        store: PromptStore,
        redis_url: str | None = None,
        refresh_s: float = 5.0,
        redis_prefix: str = "keel:",
    ) -> None:
        super().__init__(prompts_channel(redis_prefix), redis_url, refresh_s)
        self.store = store
        self._by_name: dict[tuple[str | None, str], _Entry] = {}  # (project id, prompt name)
        self.default_project: str | None = None  # where the master key's requests resolve prompts

    def load(self) -> None:
        """(Re)load every prompt; unchanged versions keep their compiled templates."""
        old = self._by_name
        fresh: dict[tuple[str | None, str], _Entry] = {}
        self.default_project = self.store.default_project_id()
        for p in self.store.load_all():
            entry = _Entry(p.get("project_id"), p["name"], p["type"], int(p["latest_version"]))
            prev = old.get((entry.project_id, entry.name))
            for row in p["versions"]:
                n = int(row["version"])
                kept = prev.versions.get(n) if prev is not None else None
                if kept is not None and kept.version.content_hash == row["content_hash"]:
                    entry.versions[n] = kept
                else:
                    try:
                        entry.versions[n] = CompiledPrompt(version_from_dict(row))
                    except Exception:  # validated on push; a hand-edited row must not stop the gateway
                        log.exception("prompt %s version %s does not compile; skipped", p["name"], n)
            entry.labels = {lb["label"]: label_from_dict(lb) for lb in p["labels"]}
            fresh[(entry.project_id, entry.name)] = entry
        self._by_name = fresh
        self.reloads += 1

    def names(self, project_id: str | None = None) -> list[str]:
        pid = project_id or self.default_project
        return sorted(n for p, n in self._by_name if p == pid)

    def resolve(
        self,
        name: str,
        label: str | None = None,
        version: int | None = None,
        user: str | None = None,
        project_id: str | None = None,
    ) -> CompiledPrompt:
        """The compiled version a caller gets: by number, or through a label (sticky canary per user).

        Prompts are looked up in ``project_id`` (the caller's project; None: the ``default`` project).
        """
        entry = self._by_name.get((project_id or self.default_project, name))
        if entry is None:
            raise NotFound(f"prompt '{name}' not found", code="prompt_not_found", param="model")
        if version is None:
            if label is None or label == "latest":
                version = entry.latest
            else:
                state = entry.labels.get(label)
                if state is None:
                    raise NotFound(
                        f"prompt '{name}' has no label '{label}'",
                        code="prompt_label_not_found",
                        param="prompt_label",
                    )
                version = choose_version(name, state, user)
        compiled = entry.versions.get(version)
        if compiled is None:
            raise NotFound(
                f"prompt '{name}' has no version {version}",
                code="prompt_version_not_found",
                param="prompt_version",
            )
        return compiled
