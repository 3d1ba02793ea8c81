"""The built-in rails, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keel.guardrails.injection import InjectionRail
from keel.guardrails.output import BannedRail, JsonRail, MaxLengthRail
from keel.guardrails.pii import PIIRail
from keel.guardrails.secrets import SecretsRail
from keel.plugins import hookimpl

__all__ = ["register_rails"]


@hookimpl
def register_rails(register: Callable[[str, Any], None]) -> None:
    register("pii", lambda options, ctx: PIIRail(options))
    register("secrets", lambda options, ctx: SecretsRail(options))
    register("injection", lambda options, ctx: InjectionRail(options, complete=ctx.complete))
    register("json", lambda options, ctx: JsonRail(options))
    register("banned", lambda options, ctx: BannedRail(options))
    register("max_length", lambda options, ctx: MaxLengthRail(options))
