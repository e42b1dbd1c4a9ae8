"""Owns the daemon's short, bounded memory of deliveries for the operator console (SPEC §9).

Two things per webhook, both in memory only and both bounded: the last ``KEPT`` attempts
(time, event or batch id, outcome, status, latency, response excerpt) and one bucket per
minute for the last ``MINUTES`` minutes (delivered, failed, retried events and the queue
depth last sampled in that minute). Webhook names come from the configuration, never
from devices, and :meth:`Activity.keep_only` drops the names a reload removed, so nothing
here grows with traffic.

The dispatcher calls :meth:`Activity.record` once per attempt (a deque append and an
integer add); the admin server samples queue depths. Excerpts are kept as the endpoint sent
them (cut short) and redacted when they are read.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

KEPT = 50  # attempts per webhook
MINUTES = 60  # per-minute buckets per webhook
EXCERPT = 300  # characters of a response body kept per attempt

Kind = Literal["delivered", "failed", "retried"]
# Outcome.kind -> the picture's series: 'dead' and 'gone' end a delivery, 'retry' does not.
_KINDS: dict[str, Kind] = {"delivered": "delivered", "retry": "retried", "dead": "failed",
                           "gone": "failed"}
_INDEX = {"delivered": 1, "failed": 2, "retried": 3}
# Outcome.kind -> its count's index in a bucket (one lookup per attempt, not two).
_SLOT = {outcome: _INDEX[kind] for outcome, kind in _KINDS.items()}


class Attempt(NamedTuple):
    """One kept attempt, read-only. A named tuple, not a frozen dataclass: one is made per
    attempt, and a frozen dataclass's __init__ costs ~5x as much (a setattr per field)."""

    at: float  # wall-clock seconds
    event_id: str  # the webhook-id the endpoint saw (an event or a batch id)
    events: int
    outcome: str  # Outcome.kind
    status: int | None
    latency_ms: int
    cause: str
    excerpt: str | None


class Activity:
    """Recent attempts and per-minute counts of every webhook of one bridge."""

    def __init__(self, kept: int = KEPT, minutes: int = MINUTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.kept, self.minutes, self.clock = kept, minutes, clock
        self._attempts: dict[str, deque[Attempt]] = {}
        # Each bucket: [minute number, delivered, failed, retried, queue depth or None].
        self._buckets: dict[str, deque[list[Any]]] = {}

    def record(self, webhook: str, event_id: str, outcome: Any, events: int = 1) -> None:
        """Note one attempt; ``outcome`` is a :class:`bridge.delivery.Outcome`."""
        now = self.clock()
        ring = self._attempts.get(webhook)
        if ring is None:
            ring = self._attempts[webhook] = deque(maxlen=self.kept)
        response = outcome.response
        ring.append(Attempt(now, event_id, events, outcome.kind, outcome.status,
                            round(outcome.elapsed * 1000), outcome.cause or "",
                            response[:EXCERPT] if response else None))
        slot = _SLOT.get(outcome.kind)
        if slot is not None:
            self._bucket(webhook, now)[slot] += events

    def sample_queue(self, depths: dict[str, int]) -> None:
        """Note each webhook's current queue depth (the last sample of a minute wins)."""
        now = self.clock()
        for webhook, depth in depths.items():
            self._bucket(webhook, now)[4] = depth

    def keep_only(self, webhooks: Iterable[str]) -> None:
        """Forget webhooks that are no longer configured."""
        keep = set(webhooks)
        for table in (self._attempts, self._buckets):
            for name in [n for n in table if n not in keep]:
                del table[name]

    def attempts(self, webhook: str) -> list[Attempt]:
        """The kept attempts of ``webhook``, newest first."""
        return list(reversed(self._attempts.get(webhook, ())))

    def series(self, webhook: str) -> list[dict[str, Any]]:
        """One entry per minute of the last hour, oldest first, missing minutes as zeros."""
        now_minute = int(self.clock() // 60)
        have = {b[0]: b for b in self._buckets.get(webhook, ())}
        result = []
        for minute in range(now_minute - self.minutes + 1, now_minute + 1):
            bucket = have.get(minute, [minute, 0, 0, 0, None])
            result.append({"t": minute * 60_000, "delivered": bucket[1], "failed": bucket[2],
                           "retried": bucket[3], "queued": bucket[4]})
        return result

    def _bucket(self, webhook: str, now: float) -> list[Any]:
        minute = int(now // 60)
        buckets = self._buckets.get(webhook)
        if buckets is None:
            buckets = self._buckets[webhook] = deque(maxlen=self.minutes)
        # A wall clock stepped back counts in the newest bucket (never a reordered deque).
        if not buckets or buckets[-1][0] < minute:
            buckets.append([minute, 0, 0, 0, None])
        return buckets[-1]
