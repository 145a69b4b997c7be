"""The overview's throughput chart: mail sent per minute as bars, laid out on the server.

Only numbers are computed here; ``templates/_chart.html`` writes them as an inline SVG
(styled by the page's CSS: no script, no image request, nothing the
Content-Security-Policy has to allow). The SVG stretches to the width of its box, so the
axis labels are HTML around it, evenly spaced: the count axis shows 0, half and the top of
a rounded scale, the time axis five minutes spread over the hour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Bar", "Chart", "layout"]

#: The drawing's coordinate system: one slot of this width per minute, bars this high.
SLOT = 10
HEIGHT = 100
#: Space between two bars, in the same units.
GAP = 2


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    height: float
    #: The hover text: the minute and its count.
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bar_width: int
    bars: tuple[Bar, ...]
    #: Labels of the count axis, top first: the scale, its half, 0.
    y_labels: tuple[str, str, str]
    #: Labels of the time axis, oldest first (HH:MM, UTC).
    x_labels: tuple[str, ...]
    total: int
    peak: int
    #: One sentence for screen readers.
    summary: str


def nice_ceiling(value: int) -> int:
    """The smallest of 2, 4, 10, 20, 50, 100, 200, ... at or above ``value``: a top
    whose half is a whole number too."""
    if value <= 2:
        return 2
    if value <= 4:
        return 4
    step = 10
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def layout(points: Sequence[tuple[datetime, int]]) -> Chart:
    """Bars for ``(start of minute, sent)`` points, oldest first, on a rounded scale."""
    counts = [n for _, n in points]
    total = sum(counts)
    peak = max(counts, default=0)
    scale = nice_ceiling(peak)
    bars = tuple(
        Bar(
            x=i * SLOT + GAP / 2,
            y=round(HEIGHT - HEIGHT * n / scale, 2),
            height=round(HEIGHT * n / scale, 2),
            label=f"{minute:%H:%M} UTC: {n} sent",
        )
        for i, (minute, n) in enumerate(points)
    )
    last = len(points) - 1
    marks = sorted({0, last // 4, last // 2, 3 * last // 4, last}) if points else []
    minutes = len(points)
    summary = (
        f"{total:,} mail sent in the last {minutes} minutes, at most {peak:,} in one minute."
        if total
        else f"No mail sent in the last {minutes} minutes."
    )
    return Chart(
        width=max(minutes, 1) * SLOT,
        height=HEIGHT,
        bar_width=SLOT - GAP,
        bars=bars,
        y_labels=(f"{scale:,}", f"{scale // 2:,}", "0"),
        x_labels=tuple(f"{points[i][0]:%H:%M}" for i in marks),
        total=total,
        peak=peak,
        summary=summary,
    )
