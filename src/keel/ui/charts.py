"""Line charts as server-rendered SVG geometry: paths, axis ticks and hover columns.

Everything is SVG attributes and CSS classes (the CSP forbids inline styles and scripts), so a
chart is drawn by the template alone and works without JavaScript.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Chart", "line_chart", "nice_ticks"]

WIDTH, HEIGHT = 560, 170
PAD_LEFT, PAD_BOTTOM, PAD_TOP = 58, 22, 8
MAX_SERIES = 6  # css classes series-0 .. series-5


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot_left: int
    plot_bottom: float
    paths: list[dict[str, str]]  # {"d", "cls", "label"}
    dots: list[dict[str, object]]  # lone points (a value between two gaps) drawn as circles
    y_ticks: list[dict[str, object]]  # {"y", "label"}
    x_ticks: list[dict[str, object]]  # {"x", "label"}
    columns: list[dict[str, object]]  # hover targets {"x", "w", "title"}
    legend: list[dict[str, str]]  # {"label", "cls"}
    empty: bool


def nice_ticks(top: float, count: int = 4, *, whole: bool = False) -> list[float]:
    """Round axis values from 0 to at least ``top`` (1-2-5 steps; whole numbers only with ``whole``)."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = max(top / count, 1.0) if whole else top / count
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if whole else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def _time_label(t: datetime, step_s: int, span_s: float) -> str:
    if step_s >= 86400:
        return t.strftime("%b %d")
    if span_s > 86400:
        return t.strftime("%b %d %H:%M")
    return t.strftime("%H:%M")


def line_chart(
    times: Sequence[datetime],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    step_s: int,
    fmt: Callable[[float], str],
    whole: bool = False,
) -> Chart:
    """Geometry of a line chart: one path per series (broken where a value is missing)."""
    series = list(series)[:MAX_SERIES]
    n = len(times)
    plot_w = WIDTH - PAD_LEFT - 8
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    bottom = float(HEIGHT - PAD_BOTTOM)
    values = [v for _, vs in series for v in vs if v is not None]
    ticks = nice_ticks(max(values, default=0.0), whole=whole)
    top = ticks[-1] or 1.0
    slot = plot_w / max(1, n)

    def x(i: int) -> float:
        return round(PAD_LEFT + slot * (i + 0.5), 2)

    def y(v: float) -> float:
        return round(bottom - (v / top) * plot_h, 2)

    paths, dots = [], []
    for k, (label, vs) in enumerate(series):
        cls = f"series-{k}"
        parts: list[str] = []
        run: list[tuple[float, float]] = []
        for i, v in enumerate([*vs, None]):
            if v is not None:
                run.append((x(i), y(v)))
                continue
            if len(run) == 1:
                dots.append({"cx": run[0][0], "cy": run[0][1], "cls": cls})
            elif run:
                parts.append("M" + " L".join(f"{px},{py}" for px, py in run))
            run = []
        paths.append({"d": " ".join(parts), "cls": cls, "label": label})
    span = (times[-1] - times[0]).total_seconds() + step_s if n else 0.0
    every = max(1, math.ceil(n / 6))
    x_ticks = [{"x": x(i), "label": _time_label(times[i], step_s, span)} for i in range(0, n, every)]
    y_ticks = [{"y": y(t), "label": fmt(t)} for t in ticks]
    columns = []
    for i, t in enumerate(times):
        lines = [t.strftime("%Y-%m-%d %H:%M UTC")]
        for label, vs in series:
            v = vs[i] if i < len(vs) else None
            lines.append(f"{label}: {'—' if v is None else fmt(v)}")
        columns.append({"x": round(PAD_LEFT + slot * i, 2), "w": round(slot, 2), "title": "\n".join(lines)})
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot_left=PAD_LEFT,
        plot_bottom=bottom,
        paths=paths,
        dots=dots,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        columns=columns,
        legend=[{"label": label, "cls": f"series-{k}"} for k, (label, _) in enumerate(series)],
        empty=not values,
    )
