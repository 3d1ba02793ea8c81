"""The model table: public model names → deployments (provider instances), and the choice among them."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from keel.config import ModelConfig, Settings
from keel.errors import ConfigError
from keel.types import Provider

__all__ = ["Deployment", "ModelTable"]


@dataclass(eq=False)
class Deployment:
    config: ModelConfig
    provider: Provider

    @property
    def price_override(self) -> tuple[float, float] | None:
        c = self.config
        if c.input_cost_per_mtok is None and c.output_cost_per_mtok is None:
            return None
        return (c.input_cost_per_mtok or 0.0, c.output_cost_per_mtok or 0.0)


class ModelTable:
    """Deployments grouped by public name; weighted random choice among a name's deployments."""

    def __init__(self, deployments: Iterable[Deployment]) -> None:
        self.by_name: dict[str, list[Deployment]] = {}
        for d in deployments:
            self.by_name.setdefault(d.config.name, []).append(d)
        self._weights = {n: [d.config.weight for d in ds] for n, ds in self.by_name.items()}

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

    def choose(self, name: str) -> Deployment | None:
        ds = self.by_name.get(name)
        if not ds:
            return None
        if len(ds) == 1:
            return ds[0]
        return random.choices(ds, weights=self._weights[name])[0]

    async def aclose(self) -> None:
        for ds in self.by_name.values():
            for d in ds:
                await d.provider.aclose()
