"""Cost from the genai-prices catalog: cached rates agree with the catalog's own calculation."""

from __future__ import annotations

import pytest

from keel.pricing import _calc, price
from keel.types import Usage


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o-mini", "openai"),
        ("gpt-4o", "openai"),
        ("claude-3-5-haiku-latest", "anthropic"),
        ("claude-sonnet-4-0", "anthropic"),
    ],
)
@pytest.mark.parametrize(
    ("inp", "out", "cached"), [(1, 1, 0), (1234, 567, 200), (99_000, 4000, 0), (150_000, 100, 1000)]
)
def test_price_matches_catalog(model: str, provider: str, inp: int, out: int, cached: int) -> None:
    got = price(model, provider, Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=cached))
    assert got is not None and got > 0
    assert got == pytest.approx(_calc(model, provider, inp, out, cached), rel=1e-9)


def test_unknown_missing_override_and_local() -> None:
    u = Usage(input_tokens=10, output_tokens=10)
    assert price("no-such-model-xyz", "openai", u) is None
    assert price("gpt-4o-mini", "openai", Usage()) is None  # no token counts: unpriced, not zero
    assert price("anything", "openai-compatible", u, override=(1.0, 3.0)) == pytest.approx(40 / 1e6)
    assert price("SmolLM2", "local", u) == 0.0
