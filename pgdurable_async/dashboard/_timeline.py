"""An instance's timeline: one bar per activity, timer and child, from scheduled to finished.

Pure: built from the history of the current execution (and, for activities still
outstanding, their live attempt).  :func:`build` pairs each command with its
completion; :func:`layout` turns the bars into SVG geometry for the template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .._base import events as ev
from .._base.types import HistoryEvent

#: Bar colours by outcome (fill, stroke); the template and its legend use these.
COLOURS = {
    "completed": ("#43a047", "#1b5e20"),
    "failed": ("#e53935", "#8e0000"),
    "running": ("#1e88e5", "#0d47a1"),
    "cancelled": ("#bdbdbd", "#757575"),
}
_KIND_OF = {ev.ACTIVITY_SCHEDULED: "activity", ev.TIMER_CREATED: "timer", ev.SUB_ORCHESTRATION_SCHEDULED: "child"}
_DONE = {
    ev.ACTIVITY_COMPLETED: "completed", ev.ACTIVITY_FAILED: "failed", ev.TIMER_FIRED: "completed",
    ev.SUB_ORCHESTRATION_COMPLETED: "completed", ev.SUB_ORCHESTRATION_FAILED: "failed",
}
_MARKED = {ev.EVENT_RECEIVED, ev.CANCEL_REQUESTED, ev.CUSTOM_STATUS_SET, ev.CONTINUED_AS_NEW} | ev.TERMINAL_KINDS
_GRAPH_PREFIX = "pgdurable.graph."
MAX_BARS = 400  # a 10,000-way fan-out draws its first bars and says how many it left out


@dataclass
class Bar:
    """One task: ``end`` None while it is outstanding; ``outcome`` keys :data:`COLOURS`."""

    kind: str
    name: str
    task_id: int
    start: datetime
    end: datetime | None = None
    outcome: str = "running"
    attempts: int | None = None
    retry_at: datetime | None = None  # an outstanding activity waiting out a retry's backoff
    fire_at: datetime | None = None  # timers
    child_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Marker:
    """A fact drawn as a tick on the time axis (an event received, a cancel, the end)."""

    kind: str
    label: str
    at: datetime


@dataclass
class Timeline:
    bars: list[Bar] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    start: datetime | None = None
    end: datetime | None = None
    left_out: int = 0


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _error_text(error: Any) -> str | None:
    if isinstance(error, Mapping):
        return f"{error.get('type') or 'Error'}: {error.get('message') or ''}".strip()
    return None if error is None else str(error)


def _name(kind: str, task_id: int, data: Mapping[str, Any], timeouts: Mapping[int, str]) -> str:
    if kind == "timer":
        return f"timeout of {timeouts[task_id]}" if task_id in timeouts else f"timer #{task_id}"
    name = str(data.get("name") or "")
    given = data.get("input")
    if name.startswith(_GRAPH_PREFIX) and isinstance(given, Mapping) and given.get("node"):
        return f"{name.removeprefix(_GRAPH_PREFIX)} {given['node']}"  # a graph node: its kind and id
    return name


def build(history: Sequence[HistoryEvent], *, finished: bool, now: datetime,
          attempts: Mapping[int, Any] | None = None, timeouts: Mapping[int, str] | None = None) -> Timeline:
    """Bars and markers of one execution.  ``attempts`` maps task ids of outstanding
    activities to their live attempt (``attempt``, ``running``, ``visible_at``); ``timeouts``
    names the timers that are an event wait's timeout (timer task id to event name)."""
    timeline = Timeline()
    bars: dict[int, Bar] = {}
    for event in history:
        at = event.recorded_at or now
        data = event.data if isinstance(event.data, Mapping) else {}
        task_id = data.get("task_id")
        if event.kind in _KIND_OF and isinstance(task_id, int):
            kind = _KIND_OF[event.kind]
            name = _name(kind, task_id, data, timeouts or {})
            bars[task_id] = Bar(kind, name, task_id, at, fire_at=_time(data.get("fire_at")),
                                child_id=data.get("instance_id") if kind == "child" else None)
        elif event.kind in _DONE and task_id in bars:
            bar = bars[task_id]
            bar.end, bar.outcome = at, _DONE[event.kind]
            if isinstance(data.get("attempts"), int) and data["attempts"] > 0:
                bar.attempts = data["attempts"]
            if bar.outcome == "failed":
                bar.error = _error_text(data.get("error"))
        if event.kind in _MARKED:
            label = str(data.get("name") or "") if event.kind == ev.EVENT_RECEIVED else ""
            timeline.markers.append(Marker(event.kind, label, at))
        if timeline.start is None or at < timeline.start:
            timeline.start = at
        if timeline.end is None or at > timeline.end:
            timeline.end = at
    for bar in bars.values():
        if bar.end is not None:
            continue
        if finished:
            bar.outcome = "cancelled"  # outstanding when the execution ended: moot
            continue
        live = (attempts or {}).get(bar.task_id)
        if live is not None:
            bar.attempts = live.attempt
            if not live.running and live.visible_at > now and live.attempt > 1:
                bar.retry_at = live.visible_at
    if not finished and timeline.start is not None:
        timeline.end = max(timeline.end or now, now)
    ordered = sorted(bars.values(), key=lambda b: b.task_id)
    timeline.bars, timeline.left_out = ordered[:MAX_BARS], max(0, len(ordered) - MAX_BARS)
    return timeline


# -- geometry ------------------------------------------------------------------------
WIDTH, LABEL_W, RIGHT_PAD, ROW_H, BAR_H, TOP = 1180, 230, 190, 22, 14, 48
_STEPS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
          1800, 3600, 7200, 14400, 21600, 43200, 86400, 172800, 604800]


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 172800:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"


def _note_place(note: str, left: float, right: float, x0: float, pending: bool) -> dict[str, Any]:
    """Where a bar's note goes: right of it, else inside it, else left of it."""
    width = len(note) * 6.3 + 8
    after = right + (30 if pending else 6)
    if after + width <= WIDTH:
        return {"note_x": round(after, 1), "note_anchor": "start", "note_class": "note"}
    if right - left >= width + 8:
        return {"note_x": round(right - 5, 1), "note_anchor": "end", "note_class": "note inside"}
    if left - width - 6 >= x0:
        return {"note_x": round(left - 6, 1), "note_anchor": "end", "note_class": "note"}
    return {"note_x": round(after, 1), "note_anchor": "start", "note_class": "note"}


def layout(timeline: Timeline) -> dict[str, Any]:
    """SVG geometry: ``bars`` (x, y, w, fill, ...), ``ticks``, ``markers``, total ``height``."""
    start = timeline.start or datetime.now().astimezone()
    end = timeline.end or start
    span = max((end - start).total_seconds(), 0.001)
    x0, x1 = LABEL_W + 10, WIDTH - RIGHT_PAD

    def x(at: datetime) -> float:
        return round(x0 + (x1 - x0) * min(max((at - start).total_seconds() / span, 0.0), 1.0), 1)

    rows = []
    for i, bar in enumerate(timeline.bars):
        y = TOP + i * ROW_H
        left = x(bar.start)
        right = x(bar.end or end)
        fill, stroke = COLOURS[bar.outcome]
        took = ((bar.end or end) - bar.start).total_seconds()
        note = _duration(took) + ("" if bar.end is not None else " so far")
        if bar.attempts and bar.attempts > 1:
            note += f" · {bar.attempts} attempts"
        if bar.retry_at is not None:
            note += " · retry pending"
        pending = bar.kind == "timer" and bar.end is None and bar.fire_at is not None
        if pending and bar.fire_at is not None:
            note += " · fires " + bar.fire_at.strftime("%H:%M:%S")
        title = f"{bar.kind} {bar.name} (task {bar.task_id}): {bar.outcome}, {note}"
        if bar.fire_at is not None:
            title += f"; fires at {bar.fire_at.isoformat(timespec='milliseconds')}"
        if bar.error:
            title += f"; {bar.error}"
        rows.append({
            "bar": bar, "y": y, "x": left, "w": max(right - left, 3.0), "fill": fill, "stroke": stroke,
            "note": note, "title": title, "retried": bool(bar.attempts and bar.attempts > 1),
            "label_y": y + BAR_H - 3, "pending": pending,
            **_note_place(note, left, max(right, left + 3.0), x0, pending),
        })
    step = next((s for s in _STEPS if span / s <= 8), _STEPS[-1])
    ticks = []
    n = 0
    while n * step <= span + 1e-9:
        ticks.append({"x": x(start + timedelta(seconds=n * step)), "label": "+" + _duration(n * step)
                      if n else "0"})
        n += 1
    height = TOP + max(len(rows), 1) * ROW_H + 16
    markers = [{"x": x(m.at), "kind": m.kind, "label": m.label,
                "title": f"{m.kind} {m.label} at {m.at.isoformat(timespec='milliseconds')}".replace("  ", " ")}
               for m in timeline.markers]
    return {"bars": rows, "ticks": ticks, "markers": markers, "height": height, "width": WIDTH,
            "x0": x0, "x1": x1, "top": TOP, "span": _duration(span), "bar_h": BAR_H, "left_out": timeline.left_out,
            "start": start, "colours": COLOURS}
