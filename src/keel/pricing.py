"""USD cost of LLM calls from the offline `genai-prices` catalog, with per-model config overrides."""

from __future__ import annotations

import functools
import warnings
from typing import Any

from keel.types import Usage

__all__ = ["price", "price_known"]

# keel provider names → genai-prices provider ids
_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "openai-compatible": None}


@functools.lru_cache(maxsize=4096)
def price_known(model: str, provider: str | None) -> bool:
    """Whether the catalog has a price for ``model`` (cached: the lookup scans the catalog)."""
    return _calc(model, provider, 1, 1, 0) is not None


def _calc(model: str, provider: str | None, inp: int, out: int, cached: int) -> float | None:
    from genai_prices import Usage as GPUsage
    from genai_prices import calc_price

    pid = _PROVIDER_IDS.get(provider or "", None)
    kwargs: dict[str, Any] = {"provider_id": pid} if pid else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            usage = GPUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached or None)
            return float(calc_price(usage, model, **kwargs).total_price)
    except (LookupError, ValueError):
        return None


def price(
    model: str | None,
    provider: str | None,
    usage: Usage,
    override: tuple[float, float] | None = None,
) -> float | None:
    """Cost in USD, or None when it cannot be priced (unknown model, or no token counts).

    ``override`` is (input, output) USD per million tokens from the config; it wins over the catalog.
    """
    if usage.input_tokens is None and usage.output_tokens is None:
        return None
    inp = usage.input_tokens or 0
    out = usage.output_tokens or 0
    if override is not None:
        return (inp * override[0] + out * override[1]) / 1_000_000
    if not model or provider == "local":
        return 0.0 if provider == "local" else None
    if not price_known(model, provider):
        return None
    return _calc(model, provider, inp, out, usage.cached_input_tokens or 0)
