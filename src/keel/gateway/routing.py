"""The model table and the router: public names → ordered deployments to try, by strategy and health.

Strategies (per name, `routing.strategies`, default `routing.strategy`):

- ``weighted`` — random, proportional to each deployment's ``weight`` (default);
- ``lowest-latency`` — smallest EWMA latency first (unmeasured deployments first, to measure them);
- ``least-busy`` — fewest requests in flight first;
- ``lowest-cost`` — cheapest catalog (or configured) price first;
- ``priority`` — tier by tier (``priority`` 1, then 2, ...), weighted within a tier.

Deployments cooling down are skipped, with the reason kept for the trace.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from keel.config import ModelConfig, RouteRule, RoutingConfig, Settings
from keel.errors import ConfigError
from keel.gateway.health import HealthBoard
from keel.gateway.limits import Limit
from keel.pricing import rates
from keel.types import Provider

__all__ = ["Deployment", "ModelTable", "Plan", "Router", "RuleInput", "match_rule"]


@dataclass(eq=False)
class Deployment:
    config: ModelConfig
    provider: Provider
    key: str = ""

    def __post_init__(self) -> None:
        c = self.config
        self.key = self.key or f"{c.name}:{c.provider}:{c.upstream_model}" + (
            f"@{c.api_base}" if c.api_base else ""
        )
        # the deployment's own RPM/TPM (its upstream account's quota), shared by every key
        self.limit: Limit | None = (
            Limit(f"deployment:{self.key}", rpm=c.rpm, tpm=c.tpm) if (c.rpm or c.tpm) else None
        )

    @property
    def label(self) -> str:
        c = self.config
        return f"{c.name}:{c.provider}:{c.upstream_model}"

    @property
    def price_override(self) -> tuple[float, float] | None:
        c = self.config
        if c.input_cost_per_mtok is None and c.output_cost_per_mtok is None:
            return None
        return (c.input_cost_per_mtok or 0.0, c.output_cost_per_mtok or 0.0)

    def unit_cost(self) -> float:
        """USD for a nominal 1k-in/1k-out call, for cost ordering; unknown prices sort last."""
        o = self.price_override
        if o is not None:
            return (o[0] + o[1]) / 1000
        if self.config.provider == "local":
            return 0.0
        r = rates(self.config.upstream_model, self.config.provider)
        return float("inf") if r is None else (r[0] + r[1]) * 1000


class ModelTable:
    """Deployments grouped by public name."""

    def __init__(self, deployments: Iterable[Deployment]) -> None:
        self.by_name: dict[str, list[Deployment]] = {}
        for d in deployments:
            self.by_name.setdefault(d.config.name, []).append(d)

    @classmethod
    def build(
        cls, settings: Settings, factories: dict[str, Any], models: Iterable[ModelConfig]
    ) -> ModelTable:
        deps = []
        for i, m in enumerate(models):
            factory = factories.get(m.provider)
            if factory is None:
                known = ", ".join(sorted(factories))
                raise ConfigError(
                    f"models[{i}].provider", f"unknown provider {m.provider!r} (known: {known})"
                )
            deps.append(Deployment(config=m, provider=factory(m, settings)))
        return cls(deps)

    def names(self) -> list[str]:
        return list(self.by_name)

    def all(self) -> list[Deployment]:
        return [d for ds in self.by_name.values() for d in ds]

    async def aclose(self) -> None:
        for d in self.all():
            await d.provider.aclose()


@dataclass
class Plan:
    """What to try for one request, in order, and what was skipped and why."""

    name: str
    candidates: list[Deployment]
    skipped: list[tuple[Deployment, str]]


def _weighted_order(ds: list[Deployment]) -> list[Deployment]:
    """A weighted random permutation (Efraimidis-Spirakis keys)."""
    if len(ds) < 2:
        return list(ds)
    return sorted(ds, key=lambda d: random.random() ** (1.0 / d.config.weight), reverse=True)


class Router:
    """Orders the deployments of a name for one request."""

    def __init__(self, table: ModelTable, routing: RoutingConfig, health: HealthBoard) -> None:
        self.table = table
        self.routing = routing
        self.health = health

    def resolve(self, name: str) -> str | None:
        """The configured name a client's model refers to (aliases followed), or None."""
        if name in self.table.by_name:
            return name
        target = self.routing.aliases.get(name)
        return target if target in self.table.by_name else None

    def strategy(self, name: str) -> str:
        return self.routing.strategies.get(name, self.routing.strategy)

    def order(self, name: str) -> list[Deployment]:
        ds = self.table.by_name.get(name, [])
        strat = self.strategy(name)
        if len(ds) < 2:
            return list(ds)
        h = self.health
        if strat == "lowest-latency":
            return sorted(_weighted_order(ds), key=lambda d: h.get(d.key).ewma_latency_s or 0.0)
        if strat == "least-busy":
            return sorted(_weighted_order(ds), key=lambda d: h.get(d.key).in_flight)
        if strat == "lowest-cost":
            return sorted(_weighted_order(ds), key=lambda d: d.unit_cost())
        if strat == "priority":
            tiers = sorted({d.config.priority for d in ds})
            return [d for t in tiers for d in _weighted_order([d for d in ds if d.config.priority == t])]
        return _weighted_order(ds)

    def plan(self, name: str, prompt_tokens: int | None = None) -> Plan:
        """Healthy deployments of ``name`` in strategy order; the rest are skipped with a reason."""
        now = time.monotonic()
        candidates: list[Deployment] = []
        skipped: list[tuple[Deployment, str]] = []
        for d in self.order(name):
            ok, why = self.health.available(d.key, now)
            limit = d.config.max_input_tokens
            if ok and limit is not None and prompt_tokens is not None and prompt_tokens > limit:
                ok, why = False, f"prompt of ~{prompt_tokens} tokens exceeds its context window of {limit}"
            if ok:
                candidates.append(d)
            else:
                skipped.append((d, why or "unavailable"))
        return Plan(name, candidates, skipped)

    def fallbacks(self, name: str, kind: str = "fallbacks") -> list[str]:
        return list(getattr(self.routing, kind).get(name, ()))


@dataclass
class RuleInput:
    """What routing rules look at, computed lazily (the prompt estimate costs a tokenisation)."""

    model: str
    tags: list[str]
    headers: list[tuple[bytes, bytes]]
    metadata: dict[str, Any]
    has_tools: bool
    prompt_tokens: Any  # () -> int

    def header(self, name: str) -> str | None:
        key = name.encode("latin-1")
        for k, v in self.headers:
            if k == key:
                return v.decode("utf-8", "replace")
        return None


def match_rule(rules: Iterable[RouteRule], inp: RuleInput) -> RouteRule | None:
    """The first rule whose conditions all hold for the request, or None."""
    tokens: int | None = None
    for rule in rules:
        if rule.models and inp.model not in rule.models:
            continue
        if rule.no_tools and inp.has_tools:
            continue
        if rule.tags_any and not set(rule.tags_any) & set(inp.tags):
            continue
        if any(
            (got := inp.header(name)) is None or (want != "*" and got != want)
            for name, want in rule.headers.items()
        ):
            continue
        if any(str(inp.metadata.get(k)) != v for k, v in rule.metadata.items()):
            continue
        if rule.max_prompt_tokens is not None or rule.min_prompt_tokens is not None:
            if tokens is None:
                tokens = int(inp.prompt_tokens())
            if rule.max_prompt_tokens is not None and tokens > rule.max_prompt_tokens:
                continue
            if rule.min_prompt_tokens is not None and tokens < rule.min_prompt_tokens:
                continue
        return rule
    return None
