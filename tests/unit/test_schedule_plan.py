"""The pure side of schedules: specs, fire times (cron in a time zone, intervals) and one pass's plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import pgdurable_async as pgd
from pgdurable_async._base.schedules import CATCHUP_POLL, PEER_GRACE, make_spec, plan

T0 = datetime(2024, 3, 30, 12, 0, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def test_interval_times_stay_on_their_grid() -> None:
    spec = make_spec(cron=None, every=timedelta(seconds=10))
    first = spec.first_fire(T0 + timedelta(microseconds=400))
    assert first == T0 + 10 * S
    assert spec.next_after(first + 25 * S, anchor=first) == first + 30 * S
    assert spec.last_before(first + 30 * S, anchor=first) == first + 20 * S
    assert make_spec(cron=None, every=2.5).every == timedelta(seconds=2.5)


def test_cron_in_a_time_zone_across_daylight_saving() -> None:
    spec = make_spec(cron="30 2 * * *", every=None, timezone="Europe/Paris")
    # 2024-03-31 02:30 does not exist in Paris (clocks jump 02:00 -> 03:00): cronsim fires at 03:00 local.
    assert spec.next_after(T0) == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    assert spec.next_after(datetime(2024, 3, 31, 1, 0, tzinfo=UTC)) == datetime(2024, 4, 1, 0, 30, tzinfo=UTC)
    seconds = make_spec(cron="*/15 * * * * *", every=None)
    assert seconds.next_after(T0) == T0 + 15 * S and seconds.last_before(T0, anchor=T0) == T0 - 15 * S
    assert spec.first_fire(T0) > T0


@pytest.mark.parametrize("kwargs", [
    {"cron": None, "every": None}, {"cron": "* * * * *", "every": 1}, {"cron": "bad", "every": None},
    {"cron": "* * * * * * *", "every": None}, {"cron": None, "every": 0.2}, {"cron": None, "every": "5"},
    {"cron": None, "every": 5, "overlap": "queue"}, {"cron": None, "every": 5, "catchup": "first"},
    {"cron": "* * * * *", "every": None, "timezone": "Nowhere/City"},
])
def test_bad_specs_are_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(pgd.InvalidArgument):
        make_spec(**kwargs)  # type: ignore[arg-type]


def _plan(catchup: str, *, overlap: str = "allow", next_at: datetime, now: datetime, watching: datetime,
          running: bool = False) -> tuple[list[datetime], datetime, datetime | None]:
    spec = make_spec(cron=None, every=S, catchup=catchup, overlap=overlap)
    p = plan(spec, next_fire_at=next_at, now=now, watching_since=watching, previous_running=running)
    return p.fire, p.next_fire_at, p.defer_until


def test_on_time_firings_always_fire() -> None:
    for catchup in ("all", "latest", "none"):
        assert _plan(catchup, next_at=T0, now=T0 + timedelta(milliseconds=3), watching=T0 - 60 * S) == (
            [T0], T0 + S, None)
    # late while watching (a slow pass): each due time still fires
    assert _plan("latest", next_at=T0, now=T0 + 2.5 * S, watching=T0 - S)[0] == [T0, T0 + S, T0 + 2 * S]


def test_missed_firings_follow_catchup() -> None:
    now = T0 + 10.5 * S  # a runtime came back at T0 + 10.5 s; T0 .. T0 + 10 s were missed
    assert _plan("all", next_at=T0, now=now, watching=now) == ([T0 + i * S for i in range(11)], T0 + 11 * S, None)
    assert _plan("latest", next_at=T0, now=now, watching=now) == ([T0 + 10 * S], T0 + 11 * S, None)
    # the last missed time is 0.5 s old: set aside for a second, then skipped; what came due since fires
    assert _plan("none", next_at=T0, now=now, watching=now) == ([], T0, T0 + 11 * S)
    assert _plan("none", next_at=T0, now=T0 + 11.05 * S, watching=now) == ([T0 + 11 * S], T0 + 12 * S, None)


def test_none_leaves_a_just_missed_time_to_a_watching_peer() -> None:
    now = T0 + 0.3 * S  # T0 came due 0.3 s before this runtime looked: a peer may be firing it
    assert _plan("none", next_at=T0, now=now, watching=now) == ([], T0, T0 + PEER_GRACE)
    later = T0 + PEER_GRACE + 0.01 * S  # still not fired: nobody watched, it was missed; T0 + 1 s is on time
    assert _plan("none", next_at=T0, now=later, watching=now) == ([T0 + S], T0 + 2 * S, None)


def test_overlap_skip() -> None:
    assert _plan("latest", overlap="skip", next_at=T0, now=T0, watching=T0 - S, running=True) == ([], T0 + S, None)
    assert _plan("latest", overlap="skip", next_at=T0, now=T0 + 1.5 * S, watching=T0 - S) == ([T0], T0 + 2 * S, None)
    # catchup="all": the missed firings start one after another, none dropped
    now = T0 + 5.5 * S
    assert _plan("all", overlap="skip", next_at=T0, now=now, watching=now) == ([T0], T0 + S, None)
    assert _plan("all", overlap="skip", next_at=T0 + S, now=now, watching=now, running=True) == (
        [], T0 + S, now + CATCHUP_POLL)
