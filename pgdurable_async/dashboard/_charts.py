"""The overview's throughput charts: stacked bars per minute, as SVG geometry for the template."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT, X0, TOP, BOTTOM = 520, 150, 34, 10, 18

#: (key, title, stacks): each stack is a column per minute, its series stacked bottom up.
CHARTS = [
    ("activities", "Activities", [[("activity_completed", "completed", "#43a047"),
                                   ("activity_failed", "failed (after retries)", "#e53935")]]),
    ("instances", "Instances", [[("orchestration_started", "started", "#90caf9")],
                                [("orchestration_completed", "completed", "#43a047"),
                                 ("orchestration_failed", "failed", "#e53935")]]),
]
_FINISHED = {"activity_completed", "activity_failed", "orchestration_completed", "orchestration_failed"}


def _nice(value: int) -> int:
    """The smallest 1-2-5 number at least ``value`` (the top of the y axis)."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= value:
                return factor * magnitude
        magnitude *= 10


def charts(minutes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One chart per entry of :data:`CHARTS`, minutes oldest first, one column per stack and minute."""
    out = []
    plot_h = HEIGHT - TOP - BOTTOM
    base = TOP + plot_h
    step = (WIDTH - X0 - 4) / max(len(minutes), 1)
    for key, title, stacks in CHARTS:
        top = _nice(max([sum(m[s] for s, _, _ in stack) for m in minutes for stack in stacks] + [1]))
        width = (step - 4) / len(stacks)
        columns = []
        for i, minute in enumerate(minutes):
            for j, stack in enumerate(stacks):
                y = float(base)
                segments = []
                for skey, label, colour in stack:
                    n = minute[skey]
                    if n:
                        h = max(plot_h * n / top, 1.0)
                        y -= h
                        segments.append({"key": skey, "label": label, "colour": colour, "n": n, "y": round(y, 1),
                                         "h": round(h, 1)})
                columns.append({"x": round(X0 + i * step + 2 + j * width, 1), "w": round(width - 1, 1),
                                "segments": segments, "label": minute["minute"].strftime("%H:%M"),
                                "tick": j == 0 and (len(minutes) - 1 - i) % 3 == 0, "mid": round(step / 2 - 2, 1)})
        series = [entry for stack in stacks for entry in stack]
        total = sum(m[s] for m in minutes for s, _, _ in series if s in _FINISHED)
        out.append({"key": key, "title": title, "columns": columns, "max": top, "total": total,
                    "series": [{"key": s, "label": label, "colour": c} for s, label, c in series],
                    "width": WIDTH, "height": HEIGHT, "x0": X0, "top": TOP, "base": base})
    return out
