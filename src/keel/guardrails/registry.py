"""Rail factories by name, from the ``register_rails`` plugin hook (built-ins register through it too).

A third-party package adds a rail with one module under the ``keel`` entry-point group::

    from keel.plugins import hookimpl

    class NoCompetitors:
        name, tier, window = "no_competitors", 0, 32

        def __init__(self, options, ctx):
            self.words = options.get("words", ["acme"])

        def scan(self, text):
            return [Finding("competitor", i, i + len(w)) for w in self.words if (i := text.find(w)) >= 0]

    @hookimpl
    def register_rails(register):
        register("no_competitors", NoCompetitors)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.guardrails.injection import Complete
from keel.plugins import get_plugin_manager

__all__ = ["RailContext", "rail_factories"]

_BUILTIN = "keel.guardrails.builtin"


@dataclass(frozen=True)
class RailContext:
    """What a rail factory may use besides its options: ``complete`` asks an LLM (judges)."""

    complete: Complete | None = None


def rail_factories() -> dict[str, Callable[[dict[str, Any], RailContext], Any]]:
    """Every registered rail factory by name: ``factory(options, ctx) -> Rail``."""
    import importlib

    pm = get_plugin_manager()
    if not pm.has_plugin(_BUILTIN):
        pm.register(importlib.import_module(_BUILTIN), name=_BUILTIN)
    found: dict[str, Any] = {}

    def register(name: str, factory: Any) -> None:
        found[name] = factory

    pm.hook.register_rails(register=register)
    return found
