"""USD cost of LLM calls from the offline `genai-prices` catalog, with per-model config overrides.

A catalog lookup costs a few hundred microseconds, so per (model, provider) the per-token rates are
looked up once and cached; ordinary calls are then arithmetic.  Calls large enough to reach a
tiered price band (long-context surcharges) are priced by the catalog exactly.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from keel.types import Usage

__all__ = ["price", "rates"]

# keel provider names → genai-prices provider ids
_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic"}
_MTOK = 1_000_000
# below this many input tokens, no catalog price tier applies (the smallest tier starts at 128k)
_LINEAR_LIMIT = 100_000


def _calc(model: str, provider: str | None, inp: int, out: int, cached: int) -> float | None:
    from genai_prices import Usage as GPUsage
    from genai_prices import calc_price

    pid = _PROVIDER_IDS.get(provider or "")
    kwargs: dict[str, Any] = {"provider_id": pid} if pid else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            usage = GPUsage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached or None)
            return float(calc_price(usage, model, **kwargs).total_price)
    except (LookupError, ValueError):
        return None


@functools.lru_cache(maxsize=4096)
def rates(model: str, provider: str | None) -> tuple[float, float, float] | None:
    """USD per token (input, output, cached input) from the catalog, or None when the model is unknown."""
    base = _calc(model, provider, 1000, 0, 0)
    if base is None:
        return None
    out = _calc(model, provider, 0, 1000, 0) or 0.0
    cached = _calc(model, provider, 1000, 0, 1000)
    return base / 1000, out / 1000, (base if cached is None else cached) / 1000


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
        return (inp * override[0] + out * override[1]) / _MTOK
    if provider == "local":
        return 0.0
    if not model:
        return None
    r = rates(model, provider)
    if r is None:
        return None
    cached = min(usage.cached_input_tokens or 0, inp)
    if inp >= _LINEAR_LIMIT:
        return _calc(model, provider, inp, out, cached)
    return (inp - cached) * r[0] + cached * r[2] + out * r[1]
