"""The delivery policy (bridge.policy) through the SPEC §5 scenarios, on a fake clock: no
sockets, no sleeps, no event loop. One probe per backoff step, 429 and timeouts never
counted, 410 disables, Retry-After honoured and capped, ordered FIFO through retries, batch
formation, and the time an endpoint that keeps answering 500 takes to be disabled."""

from __future__ import annotations

import email.utils
import random
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from bridge.config import BatchConfig, RetryConfig
from bridge.delivery import Outcome, classify_exception, classify_response
from bridge.policy import (
    DEAD,
    DELIVERED,
    DISABLED,
    GONE,
    RETRY,
    RETRY_AFTER_CAP,
    DeliveryPolicy,
    TokenBucket,
    form_batches,
    parse_retry_after,
    step_ceiling,
    take,
    time_to_disable,
)

DEFAULTS = RetryConfig()


@dataclass
class Row:
    id: int
    device_id: str | None
    created: float = 0.0
    batch_id: str | None = None


class Endpoint:
    """A scripted endpoint: the answers to successive attempts (the last one repeats), an
    HTTP status or an exception."""

    def __init__(self, *answers: int | BaseException) -> None:
        self.answers = list(answers)

    def __call__(self, row: Row) -> int | BaseException:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def classify(answer: int | BaseException) -> Outcome:
    if isinstance(answer, BaseException):
        return classify_exception(answer)
    headers = {"Retry-After": "30"} if answer == 429 else {}
    return classify_response(answer, headers, "")


class Harness:
    """One webhook driven by the pure policy: a fake monotonic clock, a queue of rows,
    requests that take ``request_time``; records what the endpoint sees."""

    def __init__(self, endpoint: Endpoint, concurrency: int = 4, failure_limit: int = 10,
                 queued: int = 20, ordered: bool = False, devices: int = 1,
                 request_time: float = 0.01, retry: RetryConfig = DEFAULTS) -> None:
        self.policy = DeliveryPolicy(retry, failure_limit, concurrency, random.Random(1))
        self.respond: Callable[[Row], int | BaseException] = endpoint
        self.queue = deque(Row(n, f"d{n % devices}") for n in range(queued))
        self.ordered = ordered
        self.request_time = request_time
        self.now = 0.0
        self.failures = 0
        self.peak = 0  # the most consecutive counted failures seen
        self.sent: list[tuple[float, int]] = []  # (time, row id) as the endpoint saw them
        self.delivered: list[int] = []
        self.state = "ENABLED"

    def run(self, until: float) -> None:
        """Event loop of the simulation: start what the policy allows, finish the
        attempts in start order, jump the clock over pauses."""
        while self.now < until and self.state == "ENABLED" and self.queue:
            slots = self.policy.slots(0, self.now)
            if slots <= 0:
                self.now += max(self.policy.wait(self.now), 0.001)
                continue
            # The worker refetches in queue order after a failure: the queue is that order.
            batch = take(deque(self.queue), slots, set(), {}, self.ordered)
            started = self.now
            for row in batch:
                self.sent.append((started, row.id))
            self.now += self.request_time
            for row in batch:
                outcome = classify(self.respond(row))
                decision = self.policy.outcome(
                    outcome.kind, counts_as_failure=outcome.counts_as_failure,
                    retry_after=outcome.retry_after, started=started, now=self.now)
                if outcome.kind == DELIVERED:
                    self.queue.remove(row)
                    self.delivered.append(row.id)
                    self.failures = 0
                    continue
                if outcome.kind == DEAD:
                    self.queue.remove(row)
                self.failures += decision.counts
                self.peak = max(self.peak, self.failures)
                if decision.disable:
                    self.state = decision.disable
                elif self.policy.over_limit(self.failures):
                    self.state = "DISABLED_DUE_TO_ERRORS"


def test_one_probe_per_step_and_success_resumes_full_concurrency() -> None:
    h = Harness(Endpoint(*[500] * 4, 500, 500, 200), concurrency=4, queued=20)
    h.run(until=3600)
    first_burst = [at for at, _ in h.sent if at == 0.0]
    assert len(first_burst) == 4  # full concurrency until the first failure
    # Then one request per step: each probe alone, its oldest due delivery (row 0).
    probes = [(at, row) for at, row in h.sent if at > 0.0]
    assert [row for _, row in probes[:3]] == [0, 0, 0]
    assert probes[0][0] < probes[1][0] < probes[2][0]
    # The third probe succeeds: the next start sends `concurrency` requests at once.
    after = [at for at, _ in h.sent if at > probes[2][0]]
    assert after[:4] == [after[0]] * 4
    assert sorted(h.delivered) == list(range(20))
    # The first burst counted once (it began together), then one per probe: 3 in all,
    # and the success reset the count and the steps.
    assert h.peak == 3 and h.policy.step == 0 and h.failures == 0


def test_burst_in_flight_counts_once_and_does_not_lengthen_the_pause() -> None:
    policy = DeliveryPolicy(DEFAULTS, 10, 4, random.Random(3))
    first = policy.outcome(RETRY, counts_as_failure=True, retry_after=None, started=0.0,
                           now=0.2)
    assert first.counts and 0.5 <= first.pause <= 1.0 and first.refetch
    for now in (0.25, 0.3, 0.35):
        later = policy.outcome(RETRY, counts_as_failure=True, retry_after=None,
                               started=0.0, now=now)
        assert not later.counts
        assert later.pause == pytest.approx(0.2 + first.pause - now)
    assert policy.step == 1 and policy.slots(0, 0.2 + first.pause) == 1  # one probe


def test_429_timeouts_and_offline_never_count_but_pause() -> None:
    for answer in (429, TimeoutError(), ConnectionRefusedError(111, "refused")):
        h = Harness(Endpoint(answer), failure_limit=3, queued=3)
        h.run(until=6 * 3600)
        assert h.state == "ENABLED" and h.failures == 0, answer
        # Still one request per step: paused, never hammered.
        gaps = [b - a for (a, _), (b, _) in zip(h.sent[3:], h.sent[4:])]
        assert gaps and min(gaps) >= 0.5, answer


def test_counted_failures_disable_and_any_2xx_resets() -> None:
    h = Harness(Endpoint(500, 408, 425, 200, 502, 503, 504), failure_limit=4,
                concurrency=1, queued=10)
    h.run(until=24 * 3600)
    assert h.state == "DISABLED_DUE_TO_ERRORS"
    assert h.delivered == [0]  # the 2xx reset the count: 3 before it, 4 after
    assert len(h.sent) == 3 + 1 + 4


def test_410_disables_at_once_and_keeps_the_delivery() -> None:
    h = Harness(Endpoint(410), failure_limit=10, concurrency=1, queued=5)
    h.run(until=3600)
    assert h.state == DISABLED and len(h.sent) == 1 and len(h.queue) == 5
    policy = DeliveryPolicy(DEFAULTS, 10, 4)
    decision = policy.outcome(GONE, counts_as_failure=True, retry_after=None, started=0,
                              now=1)
    assert decision.disable == DISABLED and decision.counts


def test_permanent_4xx_counts_without_a_pause() -> None:
    policy = DeliveryPolicy(DEFAULTS, 10, 4)
    decision = policy.outcome(DEAD, counts_as_failure=True, retry_after=None, started=0,
                              now=1)
    assert decision.counts and decision.pause == 0 and not decision.refetch
    assert policy.slots(0, 1) == 4 and not policy.probing


def test_retry_after_is_honoured_and_capped() -> None:
    policy = DeliveryPolicy(DEFAULTS, 10, 4, random.Random(0))
    decision = policy.outcome(RETRY, counts_as_failure=False, retry_after=30.0, started=0,
                              now=0)
    assert decision.pause == 30.0
    assert policy.slots(0, 29.999) == 0 and policy.slots(0, 30.0) == 1
    # A backoff step longer than Retry-After wins; Retry-After never exceeds one hour.
    policy = DeliveryPolicy(RetryConfig(initial=600, max=600), 10, 4, random.Random(0))
    decision = policy.outcome(RETRY, counts_as_failure=False, retry_after=1.0, started=0,
                              now=0)
    assert 300 <= decision.pause <= 600
    policy = DeliveryPolicy(DEFAULTS, 10, 4, random.Random(0))
    decision = policy.outcome(RETRY, counts_as_failure=False, retry_after=86400.0,
                              started=0, now=0)
    assert decision.pause == RETRY_AFTER_CAP


def test_retry_after_header_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("99999") == RETRY_AFTER_CAP
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert parse_retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 10**6, usegmt=True),
                             now) == RETRY_AFTER_CAP
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    # An endpoint's header is hostile text: other scripts' digits are not delta-seconds.
    assert parse_retry_after("²") is None and parse_retry_after("١٢") is None
    assert classify_response(503, {"retry-after": "12"}, "").retry_after == 12.0


def test_steps_grow_to_retry_max_with_equal_jitter() -> None:
    assert [step_ceiling(DEFAULTS, n) for n in range(1, 11)] == [
        1, 3, 9, 27, 81, 243, 300, 300, 300, 300]
    policy = DeliveryPolicy(DEFAULTS, 0, 1, random.Random(5))
    now = 0.0
    for step in range(1, 200):
        decision = policy.outcome(RETRY, counts_as_failure=True, retry_after=None,
                                  started=now, now=now)
        ceiling = step_ceiling(DEFAULTS, step)
        assert ceiling / 2 <= decision.pause <= ceiling
        now += decision.pause
    assert not policy.over_limit(10**6)  # failure_limit 0: never disabled
    policy.reset()
    assert policy.step == 0 and policy.slots(0, now) == 1 and not policy.probing


def test_ordered_fifo_through_retries() -> None:
    """Every row's first attempt fails (503): per device the endpoint still receives the
    rows oldest first, and a retried row is never overtaken by a younger one."""
    h = Harness(Endpoint(200), concurrency=4, ordered=True, devices=3, queued=30)
    tried: set[int] = set()

    def answer(row: Row) -> int:
        if row.id in tried:
            return 200
        tried.add(row.id)
        return 503

    h.respond = answer
    h.run(until=24 * 3600)
    assert sorted(h.delivered) == list(range(30))
    for device in range(3):
        attempts = [row for _, row in h.sent if row % 3 == device]
        # Each row twice (fail, then deliver), in queue order: 0,0,3,3,6,6...
        assert attempts == [r for r in range(device, 30, 3) for _ in (0, 1)], device
        assert [r for r in h.delivered if r % 3 == device] == list(range(device, 30, 3))


def test_take_skips_busy_devices_and_keeps_their_places() -> None:
    ready = deque([Row(1, "a"), Row(2, "a"), Row(3, "b"), Row(4, "c"), Row(5, "b")])
    taken = take(ready, 10, {4}, {"b": 1}, ordered=True)
    assert [r.id for r in taken] == [1]  # "a" once, "b" busy, 4 in flight
    assert [r.id for r in ready] == [2, 3, 5]
    ready = deque([Row(1, "a"), Row(2, "a"), Row(3, "b")])
    assert [r.id for r in take(ready, 2, set(), {}, ordered=False)] == [1, 2]


def test_batch_formation() -> None:
    batch = BatchConfig(max_events=3, max_wait=2.0)
    rows = [Row(n, "d", created=100.0 + n * 0.1) for n in range(7)]
    groups, wait = form_batches(rows, batch, 5, now=101.0)
    # Two full batches go; the partial one (row 6, 0.4 s old) waits for max_wait.
    assert [[r.id for r in g] for g in groups] == [[0, 1, 2], [3, 4, 5]] and wait is None
    groups, wait = form_batches(rows[6:], batch, 5, now=101.0)
    assert groups == [] and wait == pytest.approx(1.6)
    groups, _ = form_batches(rows[6:], batch, 5, now=102.6)
    assert [[r.id for r in g] for g in groups] == [[6]]
    # The limit, and rows already in a batch (a retry) end the fresh run.
    assert len(form_batches(rows, batch, 1, now=200.0)[0]) == 1
    rows[2].batch_id = "bat_x"
    assert [[r.id for r in g] for g in form_batches(rows, batch, 5, now=200.0)[0]] == [[0, 1]]
    # A clock behind the rows (by an hour): the wait is never longer than max_wait.
    assert form_batches(rows[6:], batch, 5, now=100.0 - 3600)[1] == 2.0


def test_token_bucket_on_a_fake_clock() -> None:
    bucket = TokenBucket(2.0, now=0.0)
    for _ in range(2):
        assert bucket.wait_time(0.0) == 0.0
        bucket.take()
    assert bucket.wait_time(0.0) == pytest.approx(0.5)
    assert bucket.wait_time(0.5) == 0.0
    assert bucket.wait_time(-100.0) == 0.0  # time never runs backwards for the bucket


def test_time_to_disable_with_the_defaults_is_about_15_minutes() -> None:
    """SPEC §5: with the defaults an endpoint that keeps answering 500 is disabled after
    about 15 minutes. 1,000 simulated runs of the pure policy."""
    rng = random.Random(12)
    runs = sorted(time_to_disable(DEFAULTS, 10, rng) / 60 for _ in range(1000))
    median = statistics.median(runs)
    p90 = runs[899]
    print(f"time to disable (min): min {runs[0]:.1f} median {median:.1f}"
          f" p90 {p90:.1f} max {runs[-1]:.1f}")
    assert 14 <= median <= 17.5
    assert runs[0] >= 10.5 and runs[-1] <= 21.1
    # The bounds of the rule: 9 pauses with ceilings 1..300 s, each in [c/2, c].
    ceilings = sum(step_ceiling(DEFAULTS, n) for n in range(1, 10))
    assert ceilings == 1264
