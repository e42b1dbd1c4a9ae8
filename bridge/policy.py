"""The delivery policy of SPEC §5, as a pure object.

Owns the decisions about one webhook's attempts: how long the webhook pauses after a
failure and when its single probe may go, which outcomes count toward ``failure_limit``,
when the webhook is disabled, what ``Retry-After`` means, which queued deliveries may go
now (``ordered``: one per device, oldest first, through retries), how deliveries are
formed into batches, and the rate limit. Every decision takes the outcome and the time and
returns what to do; there is no I/O and no asyncio here, so the unit tests drive it with a
fake clock (:mod:`bridge.dispatch` does the store and HTTP I/O and asks this module).

Times: pauses and the rate limit run on the monotonic clock (``now`` from
``time.monotonic``: an NTP step of the wall clock neither stalls nor rushes a webhook).
Only batch formation compares with stored creation times (the store's queue clock).

The backoff step rule (SPEC §5 "about 15 minutes"): after the n-th consecutive failed
step the webhook pauses for a delay drawn uniformly from ``[c/2, c]`` ("equal jitter"),
with ``c = min(retry.max, retry.initial * 3 ** (n - 1))``. Jitter keeps many gateways
that saw the same outage from probing in step; the floor of half the ceiling keeps the
expected pause at three quarters of it (full jitter would halve it, and the time to
disable with it). With the defaults (1 s, 5 min, failure_limit 10) the 10th counted
failure comes after 9 pauses with ceilings 1, 3, 9, 27, 81, 243, 300, 300, 300 s: between
10.5 and 21 minutes, 15.8 expected (see ``bench/time_to_disable.py``).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from .config import BatchConfig, RetryConfig

DELIVERED, RETRY, DEAD, GONE = "delivered", "retry", "dead", "gone"
OutcomeKind = Literal["delivered", "retry", "dead", "gone"]
DISABLED, DISABLED_DUE_TO_ERRORS = "DISABLED", "DISABLED_DUE_TO_ERRORS"
RETRY_AFTER_CAP = 3600.0  # SPEC §5: Retry-After is honoured up to one hour
GROWTH = 3.0  # each failed step multiplies the backoff ceiling by this


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` (delta-seconds or HTTP-date, compared with
    the wall-clock ``now``), capped at 1 h. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²", which float() refuses
        return min(float(value), RETRY_AFTER_CAP)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment is None:
        return None
    delay = moment.timestamp() - (time.time() if now is None else now)
    return min(max(delay, 0.0), RETRY_AFTER_CAP)


def step_ceiling(retry: RetryConfig, step: int) -> float:
    """The longest pause after the ``step``-th consecutive failed step (1-based)."""
    return min(retry.max, retry.initial * GROWTH ** min(step - 1, 60))


def backoff_delay(retry: RetryConfig, step: int, rng: random.Random) -> float:
    """Equal jitter: uniform in ``[ceiling / 2, ceiling]``."""
    ceiling = step_ceiling(retry, step)
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one attempt's outcome means for the webhook."""

    pause: float = 0.0  # seconds from now before the next attempt may start
    counts: bool = False  # the attempt counts toward failure_limit
    disable: str | None = None  # the state to switch to now (410 Gone: DISABLED)
    refetch: bool = False  # prefetched rows must not overtake the failed ones


class DeliveryPolicy:
    """One webhook's backoff, probe and failure policy (see the module docstring).

    After a retryable failure the webhook pauses for one step, then sends a single probe
    (its oldest due delivery); a success resumes full concurrency. Attempts that were
    already in flight when the current pause began fail together with the one that
    started it: they neither lengthen the pause nor count again toward failure_limit, so
    the count follows the requests the endpoint sees, one per step.
    """

    def __init__(self, retry: RetryConfig, failure_limit: int, concurrency: int,
                 rng: random.Random | None = None) -> None:
        self.retry = retry
        self.failure_limit = failure_limit
        self.concurrency = concurrency
        self.rng = rng or random.Random()
        self.reset()

    def reset(self) -> None:
        """The webhook (re-)enabled: no pause, no probe, backoff from the first step."""
        self.step = 0
        self.probing = False
        self.paused_until = -math.inf
        self.pause_started = -math.inf

    # -- when attempts may start -------------------------------------------------------

    def wait(self, now: float) -> float:
        """Seconds until the current pause ends (0 when not paused)."""
        return max(self.paused_until - now, 0.0)

    def slots(self, in_flight: int, now: float) -> int:
        """How many attempts may start now: none while paused, one probe after a failure,
        else up to ``concurrency`` in flight."""
        if now < self.paused_until:
            return 0
        return (1 if self.probing else self.concurrency) - in_flight

    # -- what an outcome means -----------------------------------------------------------

    def outcome(self, kind: str, *, counts_as_failure: bool, retry_after: float | None,
                started: float, now: float) -> Decision:
        """The decision for an attempt that started at ``started`` and ended at ``now``
        with an outcome of ``kind`` (see :mod:`bridge.delivery` for the classification:
        5xx, 408, 425, permanent 4xx and TLS failures count; 429, timeouts and an
        unreachable network do not)."""
        if kind == DELIVERED:  # any 2xx: full concurrency again (after a current pause)
            self.step, self.probing = 0, False
            return Decision()
        counts = counts_as_failure and started >= self.pause_started
        if kind == DEAD:  # permanent for this delivery only: no reason to pause
            return Decision(counts=counts)
        pause = self._back_off(started, now, retry_after)
        return Decision(pause=pause, counts=counts, refetch=True,
                        disable=DISABLED if kind == GONE else None)

    def _back_off(self, started: float, now: float, retry_after: float | None) -> float:
        self.probing = True  # the next attempt is a probe of the oldest due delivery
        if started < self.pause_started:
            return self.wait(now)  # the pause this attempt belongs to already began
        self.step += 1
        delay = backoff_delay(self.retry, self.step, self.rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        self.pause_started = now
        self.paused_until = now + delay
        return delay

    def over_limit(self, failures: int) -> bool:
        """``failures`` consecutive counted failures (as stored) disable the webhook."""
        return self.failure_limit > 0 and failures >= self.failure_limit

    def limit_reason(self, failures: int, cause: str) -> str:
        return (f"{failures} consecutive failures (failure_limit {self.failure_limit});"
                f" last: {cause}")


class TokenBucket:
    """``rate`` requests a second, bursts up to one second's worth (monotonic ``now``)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = now

    def wait_time(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + max(now - self.stamp, 0.0) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


# -- which queued deliveries go ---------------------------------------------------------


class Row(Protocol):
    id: int
    device_id: str | None
    created: float
    batch_id: str | None


R = TypeVar("R", bound=Row)


def take(ready: deque[R], limit: int, in_flight: Mapping[int, object] | set[int],
         busy_devices: Mapping[str | None, int], ordered: bool) -> list[R]:
    """Up to ``limit`` rows to send now from the head of ``ready`` (queue order), taken out
    of it in place. With ``ordered`` only a device's oldest queued row may go, and only
    when none of its rows is in flight; the rows passed over keep their places."""
    taken: list[R] = []
    skipped: list[R] = []
    seen_devices: set[str | None] = set()
    while ready and len(taken) < limit:
        row = ready.popleft()
        if row.id in in_flight:
            continue
        if ordered and (row.device_id in seen_devices or busy_devices.get(row.device_id)):
            skipped.append(row)
            seen_devices.add(row.device_id)
            continue
        seen_devices.add(row.device_id)
        taken.append(row)
    ready.extendleft(reversed(skipped))
    return taken


def form_batches(ready: Sequence[R], batch: BatchConfig, limit: int, now: float
                 ) -> tuple[list[list[R]], float | None]:
    """Up to ``limit`` new batches from the rows at the head of ``ready`` that belong to
    no batch yet, in queue order, and how long to wait before a partial batch may go
    (None: no wait). A partial batch goes only once its oldest member has waited
    ``max_wait`` (``now`` and ``created`` on the store's queue clock; should that clock
    ever be behind a row's time, the wait is still never longer than ``max_wait``)."""
    size = batch.max_events
    fresh: list[R] = []
    for row in ready:
        if row.batch_id is not None or len(fresh) == size * limit:
            break
        fresh.append(row)
    groups = [fresh[start:start + size] for start in range(0, len(fresh), size)]
    if groups and len(groups[-1]) < size:
        oldest = min(r.created for r in groups[-1])
        if now < oldest + batch.max_wait:
            groups.pop()
            if not groups:
                return [], min(oldest + batch.max_wait - now, batch.max_wait)
    return groups, None


def time_to_disable(retry: RetryConfig, failure_limit: int, rng: random.Random,
                    request_time: float = 0.05, concurrency: int = 4) -> float:
    """Seconds from the first failed attempt until an endpoint that answers every request
    with a counted failure (HTTP 500) is disabled, simulated on the pure policy with a
    fake clock: the first burst of ``concurrency`` requests, then one probe per step."""
    policy = DeliveryPolicy(retry, failure_limit, concurrency, rng)
    now, failures = 0.0, 0
    in_flight = [now] * policy.slots(0, now)  # start times of the first burst
    while True:
        started = in_flight.pop(0)
        now = max(now, started + request_time)
        decision = policy.outcome(RETRY, counts_as_failure=True, retry_after=None,
                                  started=started, now=now)
        failures += decision.counts
        if policy.over_limit(failures):
            return now
        if not in_flight:
            now += policy.wait(now)
            in_flight = [now] * policy.slots(0, now)


Clock = Callable[[], float]
