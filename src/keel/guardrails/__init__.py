"""Guardrails: rails that scan what goes to a model and what comes back, and act on what they find.

Rails are plugins behind one protocol (:class:`Rail`, :class:`AsyncRail`), registered through the
``register_rails`` hook of :mod:`keel.plugins`; :class:`Guardrails` builds the configured policies
and :class:`Session` runs one request through them (see docs/guardrails.md).
"""

from keel.guardrails.base import ACTIONS, AsyncRail, Finding, GuardrailBlocked, Rail, RailOptionError
from keel.guardrails.engine import Decision, Guardrails, RailSpec, Session, StreamGuard
from keel.guardrails.injection import InjectionRail, heuristic_score
from keel.guardrails.output import BannedRail, JsonRail, MaxLengthRail
from keel.guardrails.pii import PIIRail, iban_valid, luhn_valid
from keel.guardrails.registry import RailContext, rail_factories
from keel.guardrails.secrets import SecretsRail
from keel.guardrails.vault import Vault

__all__ = [
    "ACTIONS",
    "AsyncRail",
    "BannedRail",
    "Decision",
    "Finding",
    "GuardrailBlocked",
    "Guardrails",
    "InjectionRail",
    "JsonRail",
    "MaxLengthRail",
    "PIIRail",
    "Rail",
    "RailContext",
    "RailOptionError",
    "RailSpec",
    "SecretsRail",
    "Session",
    "StreamGuard",
    "Vault",
    "heuristic_score",
    "iban_valid",
    "luhn_valid",
    "rail_factories",
]
