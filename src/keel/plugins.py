"""Plugin hooks (pluggy). Built-in providers register through the same hook third parties use.

A third-party package exposes a module under the ``keel`` entry-point group that implements::

    from keel.plugins import hookimpl

    @hookimpl
    def register_providers(register):
        register("my-provider", MyProviderFactory)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["PROVIDERS", "get_plugin_manager", "hookimpl", "hookspec", "provider_factories"]

hookspec = pluggy.HookspecMarker("keel")
hookimpl = pluggy.HookimplMarker("keel")

BUILTIN_PLUGINS = ("keel.providers.openai", "keel.providers.anthropic", "keel.providers.local")


class KeelSpecs:
    @hookspec
    def register_providers(self, register: Callable[[str, Any], None]) -> None:
        """Register provider factories: ``register(name, factory)``; factory(deployment, settings) -> Provider."""

    @hookspec
    def register_rails(self, register: Callable[[str, Any], None]) -> None:
        """Register guardrails: ``register(name, factory)``; factory(options, ctx) -> Rail.

        The protocol is in ``keel.guardrails.base``; built-ins register through this hook too.
        """

    @hookspec
    def register_scorers(self, register: Callable[[str, Any], None]) -> None:
        """Register eval scorers: ``register(name, factory)``; factory(options, ctx) -> Scorer.

        The protocol is in ``keel.evals.scorers.base``; built-ins register through this hook too.
        """


_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and installed plugins loaded."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("keel")
        pm.add_hookspecs(KeelSpecs)
        for mod in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(mod), name=mod)
        pm.load_setuptools_entrypoints("keel")
        _pm = pm
    return _pm


def provider_factories() -> dict[str, Any]:
    """Every registered provider factory by name."""
    found: dict[str, Any] = {}

    def register(name: str, factory: Any) -> None:
        found[name] = factory

    get_plugin_manager().hook.register_providers(register=register)
    return found


PROVIDERS = provider_factories
