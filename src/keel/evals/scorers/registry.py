"""Scorer registry: built-ins and third-party plugins through the same pluggy hook.

Built-in scorer modules are registered on the shared plugin manager the first time scorers are
looked up (not at import, and not on the gateway's start path).  Another engineer's module joins
by adding its dotted path to ``BUILTIN_SCORER_MODULES``; a third party implements
``register_scorers`` in a module under the ``keel`` entry-point group.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import Any

from keel.evals.scorers.base import Scorer, ScorerConfigError, ScorerContext, ScorerFactory
from keel.plugins import get_plugin_manager

__all__ = ["BUILTIN_SCORER_MODULES", "build_scorer", "scorer_factories"]

BUILTIN_SCORER_MODULES: tuple[str, ...] = (
    "keel.evals.scorers.deterministic",
    "keel.evals.scorers.text",
    "keel.evals.scorers.embedding",
    "keel.evals.scorers.judge",
    "keel.evals.scorers.rag",
    "keel.evals.scorers.tools",
)

_lock = threading.Lock()
_loaded: set[str] = set()


def _ensure_builtins() -> None:
    pm = get_plugin_manager()
    with _lock:
        for mod in BUILTIN_SCORER_MODULES:
            if mod in _loaded:
                continue
            _loaded.add(mod)
            if pm.get_plugin(mod) is not None:
                continue
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                if exc.name == mod:  # a built-in not written yet
                    continue
                raise
            pm.register(module, name=mod)


def scorer_factories() -> dict[str, ScorerFactory]:
    """Every registered scorer factory by type name."""
    _ensure_builtins()
    found: dict[str, ScorerFactory] = {}

    def register(name: str, factory: Any) -> None:
        found[name] = factory

    get_plugin_manager().hook.register_scorers(register=register)
    return found


def _import_factory(ref: str) -> ScorerFactory:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScorerConfigError(f"cannot import scorer module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ScorerConfigError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(target):
        raise ScorerConfigError(f"scorer {ref!r} is not callable")
    return target  # type: ignore[no-any-return]


def build_scorer(
    type_: str, options: Mapping[str, Any], ctx: ScorerContext, name: str | None = None
) -> Scorer:
    """Instantiate the scorer ``type_`` (a registered name or ``module:attr``) with its options."""
    factories = scorer_factories()
    if type_ in factories:
        factory = factories[type_]
    elif ":" in type_:
        factory = _import_factory(type_)
    else:
        known = ", ".join(sorted(factories))
        raise ScorerConfigError(f"unknown scorer type {type_!r} (known: {known}; or 'module:attr')")
    scorer = factory(dict(options), ctx)
    if not hasattr(scorer, "score"):
        raise ScorerConfigError(f"scorer {type_!r} has no score() method")
    if name:
        try:
            scorer.name = name
        except AttributeError:
            pass
    elif not getattr(scorer, "name", None):
        scorer.name = type_
    return scorer
