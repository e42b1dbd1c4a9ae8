"""The console's memory of deliveries (bridge.attempts): bounded, newest first, per minute."""

from __future__ import annotations

from bridge.attempts import EXCERPT, Activity
from bridge.delivery import Outcome


class Clock:
    def __init__(self, now: float = 600_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_attempts_are_kept_newest_first_and_bounded() -> None:
    clock = Clock()
    activity = Activity(kept=3, clock=clock)
    for n in range(5):
        clock.now += 1
        activity.record("w", f"evt_{n}", Outcome("retry", 503, "HTTP 503", response="x" * 9000,
                                                  elapsed=0.0125))
    kept = activity.attempts("w")
    assert [a.event_id for a in kept] == ["evt_4", "evt_3", "evt_2"]
    assert kept[0].at == clock.now and kept[0].status == 503 and kept[0].latency_ms == 12
    assert kept[0].excerpt == "x" * EXCERPT
    assert activity.attempts("other") == []


def test_series_counts_events_per_minute_over_the_last_hour() -> None:
    clock = Clock(60 * 10_000 + 5)
    activity = Activity(clock=clock)
    activity.record("w", "bat_1", Outcome("delivered", 200), events=10)
    activity.record("w", "evt_2", Outcome("dead", 400))
    activity.record("w", "evt_3", Outcome("gone", 410))
    activity.sample_queue({"w": 7})
    clock.now += 60
    activity.record("w", "evt_4", Outcome("retry", 503))
    activity.sample_queue({"w": 3})
    activity.sample_queue({"w": 4})  # the last sample of a minute wins
    series = activity.series("w")
    assert len(series) == 60
    assert series[-1] == {"t": 10_001 * 60_000, "delivered": 0, "failed": 0, "retried": 1,
                          "queued": 4}
    assert series[-2] == {"t": 10_000 * 60_000, "delivered": 10, "failed": 2, "retried": 0,
                          "queued": 7}
    assert series[0] == {"t": (10_001 - 59) * 60_000, "delivered": 0, "failed": 0,
                         "retried": 0, "queued": None}
    clock.now += 60 * 60  # an hour later the old minutes have left the picture
    assert all(p["delivered"] == 0 and p["queued"] is None for p in activity.series("w"))


def test_buckets_are_bounded_and_removed_webhooks_forgotten() -> None:
    clock = Clock()
    activity = Activity(minutes=60, clock=clock)
    for _ in range(500):
        clock.now += 60
        activity.record("w", "e", Outcome("delivered", 200))
        activity.sample_queue({"w": 1, "gone": 2})
    assert len(activity._buckets["w"]) == 60
    clock.now -= 3600  # a wall clock stepped back counts in the newest bucket
    activity.record("w", "e", Outcome("delivered", 200))
    assert len(activity._buckets["w"]) == 60
    activity.keep_only(["w"])
    assert activity.series("gone")[-1]["queued"] is None
    assert set(activity._buckets) == {"w"} and set(activity._attempts) == {"w"}
