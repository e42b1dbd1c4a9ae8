"""Dispatch: the store and HTTP I/O of each webhook's deliveries.

Owns one :class:`WebhookWorker` per webhook: it leases due deliveries from the store (or
takes those the store hands it), keeps the requests in flight that the policy allows,
sends them through :class:`bridge.delivery.Sender`, and commits each outcome. *What* to do
is :class:`bridge.policy.DeliveryPolicy`'s decision (SPEC §5): the pause and single probe
after a failure, what counts toward ``failure_limit``, ``Retry-After``, the rate limit,
``ordered`` per-device FIFO and batch formation; the worker asks it and carries it out.
Pauses and the rate limit run on the monotonic clock; a delivery's age and due time on the
queue clock (bridge.clock, immune to wall-clock steps); times shown are wall-clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .config import WebhookConfig
from .delivery import DEAD, DELIVERED, Outcome, Sender
from .events import Event, new_id
from .metrics import Metrics
from .policy import DeliveryPolicy, TokenBucket, form_batches, take
from .render import Renderer, RenderError
from .store import DISABLED_DUE_TO_ERRORS, ENABLED, Delivery, Store

log = structlog.get_logger("bridge.dispatch")

StateListener = Callable[[str, str, str], Awaitable[None]]  # webhook, state, reason: writes it
_BLOCKED = -1.0  # rows are due but wait for a device's earlier delivery


class WebhookWorker:
    """Delivers one webhook's queue; see the module docstring for the policy."""

    def __init__(self, webhook: WebhookConfig, store: Store, sender: Sender,
                 renderer: Renderer, state: str = ENABLED,
                 on_state: StateListener | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.webhook = webhook
        self.name = webhook.name
        self.store = store
        self.sender = sender
        self.renderer = renderer
        self.state = state
        self.on_state = on_state
        self.metrics = metrics
        self.clock = clock  # wall-clock: stored times (created, last_triggered)
        self.monotonic = monotonic  # pauses and the rate limit
        self.policy = DeliveryPolicy(webhook.retry, webhook.failure_limit,
                                     webhook.concurrency)
        self.in_flight: set[int] = set()
        self._busy_devices: dict[str | None, int] = {}
        self._ready: deque[Delivery] = deque()
        # Batches whose ids are committed, waiting for a request slot: formed a round
        # ahead, so a slot that frees up never waits for the commit of a batch id.
        self._formed: deque[list[Delivery]] = deque()
        self._epoch = 0  # bumped whenever the ready queue is thrown away
        self._caught_up = False  # the queue holds nothing due beyond ready and in flight
        self._refilling = False
        self._prefetch: asyncio.Task[None] | None = None
        self._offered: list[Delivery] = []  # handed over while a refill was reading
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._bucket = (TokenBucket(webhook.rate_limit, monotonic()) if webhook.rate_limit
                        else None)
        self.task: asyncio.Task[None] | None = None
        self._stored_body = renderer.passes_stored_event
        self._task_name = f"deliver-{self.name}"  # made once: an attempt starts per message
        # Delivered rows by the commit of their delivered mark (see _marks_committed).
        self._marked: dict[asyncio.Future[Any], list[Delivery]] = {}
        self._attempt_metrics = metrics.attempts(self.name) if metrics is not None else None

    # -- control --------------------------------------------------------------------------

    def wake(self) -> None:
        """New deliveries were committed, or something else changed: look again."""
        self._changed.set()

    def set_state(self, state: str) -> None:
        if state == ENABLED and self.state != ENABLED:
            self.policy.reset()
        self.state = state
        self._clear_ready()
        self.wake()

    async def stop(self, grace: float) -> None:
        """Take no new work; let attempts in flight finish (their outcome is committed)."""
        self._stopping = True
        if self._prefetch is not None:
            self._prefetch.cancel()
        self._clear_ready()
        self.store.retire(self)  # a read still under way leases nothing to us any more
        self.wake()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    @property
    def capacity(self) -> int:
        return self.policy.slots(len(self._tasks), self.monotonic())

    @property
    def _probing(self) -> bool:
        return self.policy.probing

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping:
            self._changed.clear()
            timeout = await self._dispatch_some()
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _dispatch_some(self) -> float | None:
        """Start what may start now; return how long to wait at most before looking again
        (None: until something changes)."""
        if self.state != ENABLED:
            return None
        if (pause := self.policy.wait(self.monotonic())) > 0:
            return pause
        now = self.store.clock.now()  # queue time, as the rows' `created` (batch max_wait)
        while self.capacity > 0 and not self._stopping:
            if (self._bucket is not None
                    and (wait := self._bucket.wait_time(self.monotonic())) > 0):
                return wait
            epoch = self._epoch
            if self.webhook.batch is not None:
                # Several batches per commit, and a round ahead: forming one costs a
                # commit, sending one does not, so request slots would idle meanwhile.
                single = self._bucket is not None or self._probing
                wait = None
                if not self._formed:
                    formed, wait = await self._next_batches(
                        now, 1 if single else 2 * self.webhook.concurrency)
                    if epoch != self._epoch:  # a failure meanwhile: the probe rules now
                        self.store.release(self, [r.id for rows in formed for r in rows])
                        return 0.0
                    self._formed.extend(formed)
                take = min(1 if single else self.capacity, len(self._formed))
                batches = [self._formed.popleft() for _ in range(take)]
            else:
                row, wait = await self._next_row()
                batches = [[row]] if row is not None else []
            if not batches:
                return None if wait == _BLOCKED else wait
            if not self._may_still_start(epoch) or self.capacity < len(batches):
                # An attempt failed (or the state changed) while we read the queue: the
                # pause and the single probe now rule, so look again from the top.
                self.store.release(self, [r.id for rows in batches for r in rows])
                self._clear_ready()  # refetch in queue order: nothing may overtake these
                return 0.0
            for index, rows in enumerate(batches):
                if not self.store.claim(self, [r.id for r in rows]):
                    # The quota dropped one of these prefetched rows: give back what is
                    # left and read the queue again, in order.
                    self.store.release(self, [r.id for rest in batches[index:] for r in rest])
                    self._clear_ready()
                    return 0.0
                if self._bucket is not None:
                    self._bucket.take()
                self._start(rows)
        return None

    def _may_still_start(self, epoch: int) -> bool:
        return (epoch == self._epoch and self.state == ENABLED and not self._stopping
                and self.capacity > 0)

    async def _refill(self, want: int) -> None:
        exclude = (self.in_flight | {r.id for r in self._ready}
                   | {r.id for rows in self._formed for r in rows})
        epoch = self._epoch
        self._accept_handoff(False)
        self._refilling = True
        handoff = not self._probing and self.state == ENABLED
        try:
            rows = await self.store.write(self.store.op_lease(
                self, Store.q_due(self.name, None, want, exclude), handoff=handoff))
        except BaseException:
            offered, self._offered = self._offered, []
            self.store.release(self, [r.id for r in offered])
            self._accept_handoff(False)
            raise
        finally:
            self._refilling = False
        offered, self._offered = self._offered, []
        if epoch != self._epoch:
            # A failure cleared the queue while we read: these rows were chosen around a
            # delivery that is now waiting to be retried, so they must not jump ahead.
            self.store.release(self, [r.id for r in rows + offered])
            self._accept_handoff(False)
            return
        # Rows handed over during the read were committed after it: they come last.
        self._ready.extend(rows)
        self._ready.extend(offered)
        self._caught_up = self.store.hands_off_to(self)

    def _accept_handoff(self, on: bool) -> None:
        self._caught_up = on
        if not on:
            self.store.stop_handoff(self)

    def offer(self, rows: list[Delivery]) -> None:
        """Deliveries just committed for this webhook, leased to this worker by the store
        (it calls this after the commit)."""
        batch = self.webhook.batch
        limit = max(self.webhook.concurrency * 32, 256,
                    2 * self.webhook.concurrency * batch.max_events if batch else 0)
        if self._refilling:
            self._offered.extend(rows)
        elif self._caught_up and len(self._ready) < limit and self.state == ENABLED:
            self._ready.extend(rows)
        else:
            # Not taking them: release them and look in the queue next time.
            self._accept_handoff(False)
            self.store.release(self, [r.id for r in rows])
        self.wake()

    def resync(self) -> None:
        """Another process changed the queue (dead letters replayed): query it again."""
        self._accept_handoff(False)
        self.wake()

    def _clear_ready(self) -> None:
        self._epoch += 1
        self._accept_handoff(False)
        self.store.release(self, [r.id for r in self._ready if r.id not in self.in_flight])
        self._ready.clear()
        self.store.release(self, [r.id for rows in self._formed for r in rows])
        self._formed.clear()

    def _take(self, limit: int) -> list[Delivery]:
        return take(self._ready, limit, self.in_flight, self._busy_devices,
                    self.webhook.ordered)

    async def _next_row(self) -> tuple[Delivery | None, float | None]:
        want = 1 if self._probing else max(self.webhook.concurrency * 32, 128)
        if (self._prefetch is None and not self._probing and not self._caught_up
                and 0 < len(self._ready) <= want // 2):
            # Read the next rows while these are sent: a refill waits for a group commit,
            # and request slots would idle meanwhile.
            self._prefetch = asyncio.create_task(self._refill(want), name="prefetch")
            self._prefetch.add_done_callback(self._prefetched)
        for refill in (False, True):
            if self._caught_up and not self._ready:
                return None, None  # nothing else is due: wait for offer() or a change
            if refill or not self._ready:
                if self._prefetch is not None:
                    await asyncio.shield(self._prefetch)
                else:
                    await self._refill(want)
            taken = self._take(1)
            if taken:
                return taken[0], None
        if self._ready:
            return None, _BLOCKED
        return None, await self._until_next_due()

    def _prefetched(self, task: asyncio.Task[None]) -> None:
        self._prefetch = None
        if not task.cancelled() and task.exception() is not None:
            log.error("reading the queue failed", webhook=self.name,
                      cause=f"{type(task.exception()).__name__}: {task.exception()}")
        self.wake()

    async def _next_batches(self, now: float, limit: int
                            ) -> tuple[list[list[Delivery]], float | None]:
        """Up to ``limit`` batches to send now. A partial batch goes only once its oldest
        member has waited ``max_wait``; every batch's id and members are committed before
        it is sent, so a retry sends the same batch."""
        batch = self.webhook.batch
        assert batch is not None
        size = batch.max_events
        if len(self._ready) < size * min(limit, self.webhook.concurrency):
            await self._refill(size * (limit + 1))
        if not self._ready:
            return [], await self._until_next_due()
        first = self._ready[0]
        if first.batch_id is not None:  # an earlier attempt's batch: the same members
            rows = await self.store.write(self.store.op_lease(
                self, Store.q_batch(self.name, first.batch_id), mine_too=True))
            members = {r.id for r in rows}
            self._ready = deque(r for r in self._ready if r.id not in members)
            return [[r for r in rows if r.id not in self.in_flight]], None
        groups, wait = form_batches(self._ready, batch, limit, now)
        if not groups:
            return [], wait
        chosen = {r.id for rows in groups for r in rows}
        self._ready = deque(r for r in self._ready if r.id not in chosen)
        assignments = [(sorted(r.id for r in rows), new_id("bat_")) for rows in groups]
        await self.store.write(self.store.op_assign_batches(assignments))
        for rows, (_, batch_id) in zip(groups, assignments):
            for row in rows:
                row.batch_id = batch_id
        return groups, None

    async def _until_next_due(self) -> float | None:
        due = await self.store.read(Store.q_next_due(self.name, set(self.in_flight)))
        if due is None:
            return None
        return max(due - self.store.clock.now(), 0.05)  # queue time (bridge.clock)

    def _start(self, rows: list[Delivery]) -> None:
        for row in rows:
            self.in_flight.add(row.id)
            self._busy_devices[row.device_id] = self._busy_devices.get(row.device_id, 0) + 1
        task = asyncio.create_task(self._attempt(rows), name=self._task_name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake()

    async def _attempt(self, rows: list[Delivery]) -> None:
        started = self.monotonic()
        result: bool | asyncio.Future[Any] = True
        try:
            result = await self._attempt_rows(rows, started)
        except Exception as exc:  # a worker must outlive any one delivery
            log.error("delivery crashed", webhook=self.name, event_id=rows[0].event_id,
                      cause=f"{type(exc).__name__}: {exc}")
        finally:
            if isinstance(result, asyncio.Future):
                # Delivered: the request slot and the device (for `ordered`) are free
                # now; the rows stay out of every query until their deletion commits.
                self._free_devices(rows)
                # Every delivered mark of one commit shares its future: one callback per
                # commit, not one per message.
                waiting = self._marked.get(result)
                if waiting is None:
                    waiting = self._marked[result] = []
                    result.add_done_callback(self._marks_committed)
                waiting.extend(rows)
            else:
                self._release(rows, result)

    def _marks_committed(self, commit: asyncio.Future[Any]) -> None:
        """The delivered marks of one commit are done: their rows may be queried again
        (they are gone). The commit ended their leases; if it failed (the store closed),
        give them back."""
        rows = self._marked.pop(commit, [])
        for row in rows:
            self.in_flight.discard(row.id)
        if commit.cancelled() or commit.exception() is not None:
            self.store.release(self, [r.id for r in rows])
        self.wake()

    def _free_devices(self, rows: list[Delivery]) -> None:
        for row in rows:
            left = self._busy_devices.get(row.device_id, 1) - 1
            if left:
                self._busy_devices[row.device_id] = left
            else:
                self._busy_devices.pop(row.device_id, None)

    def _release(self, rows: list[Delivery], still_queued: bool) -> None:
        for row in rows:
            self.in_flight.discard(row.id)
        # The store took the leases back with the outcome's commit; after a crash of the
        # attempt there was none, so give them back here (a no-op otherwise).
        self.store.release(self, [r.id for r in rows])
        self._free_devices(rows)
        if still_queued:
            # Rows fetched while these were in flight may be younger deliveries of the
            # same devices: they must not overtake the retry.
            self._clear_ready()
        self.wake()

    # -- one attempt and its consequences ------------------------------------------------

    async def _attempt_rows(self, rows: list[Delivery], started: float
                            ) -> bool | asyncio.Future[Any]:
        """One attempt: True when the rows stay queued for a retry, False when they are
        gone, or the pending commit of their successful delivery."""
        webhook = self.webhook
        # Age in queue time (bridge.clock): a wall-clock step does not age a queue.
        now = self.store.clock.now()
        expired = [r for r in rows if now - r.created > webhook.retry.max_age]
        if expired:
            await self._dead(expired, f"older than retry.max_age ({webhook.retry.max_age:g}s)",
                             None, None, attempted=False)
            rows = [r for r in rows if r not in expired]
            if not rows:
                return False
        batch_id = rows[0].batch_id if webhook.batch is not None else None
        try:
            request = None
            if self._stored_body and batch_id is None:
                request = self.renderer.render_stored(rows[0].event, rows[0].device_id)
            elif self._stored_body and batch_id is not None:
                request = self.renderer.render_stored_batch(
                    [(r.event, r.event_id) for r in rows], rows[0].device_id, batch_id)
            if request is None:
                events = [Event.from_envelope(json.loads(r.event)) for r in rows]
                request = self.renderer.render(events, batch_id)
        except (RenderError, ValueError, KeyError) as exc:
            await self._dead(rows, f"cannot render the request: {exc}", None, None,
                             attempted=False)
            return False
        outcome = await self.sender.send(request, batch_id or rows[0].event_id)
        if self._attempt_metrics is not None:
            self._attempt_metrics.record(batch_id or rows[0].event_id, outcome, len(rows))
        if outcome.kind == DELIVERED:
            self.policy.outcome(DELIVERED, counts_as_failure=False, retry_after=None,
                                started=started, now=self.monotonic())
            return self.store.delivered(self.name, [r.id for r in rows], self.clock(),
                                        holder=self)
        await self._settle(rows, started, outcome)
        return outcome.kind != DEAD

    async def _settle(self, rows: list[Delivery], started: float, outcome: Outcome) -> None:
        # Decided before any await, so attempts finishing meanwhile see the pause.
        decision = self.policy.outcome(
            outcome.kind, counts_as_failure=outcome.counts_as_failure,
            retry_after=outcome.retry_after, started=started, now=self.monotonic())
        if decision.refetch:
            self._clear_ready()  # the next attempt is a probe of the oldest due delivery
        if outcome.kind == DEAD:
            await self._dead(rows, outcome.cause, outcome.status, outcome.response,
                             counts=decision.counts)
            return
        failures = await self.store.write(self.store.op_retry(
            self.name, [r.id for r in rows], outcome.status, outcome.cause,
            decision.counts, self.clock(), holder=self))
        log.warning("delivery failed", webhook=self.name, event_id=rows[0].event_id,
                    batch_id=rows[0].batch_id, attempt=rows[0].attempts + 1,
                    status=outcome.status, cause=outcome.cause,
                    retry_in=round(decision.pause, 3))
        if decision.disable is not None:
            await self.change_state(decision.disable, outcome.cause)
        else:
            await self._check_limit(failures, outcome.cause)

    async def _dead(self, rows: list[Delivery], reason: str, status: int | None,
                    response: str | None, attempted: bool = True, counts: bool = False
                    ) -> None:
        failures = await self.store.write(self.store.op_dead(
            self.name, [r.id for r in rows], reason, status, response, self.clock(),
            attempted, counts, holder=self))
        for row in rows:
            log.warning("delivery dead-lettered", webhook=self.name, event_id=row.event_id,
                        attempt=row.attempts + (1 if attempted else 0), status=status,
                        cause=reason)
        if attempted:
            await self._check_limit(failures, reason)

    async def _check_limit(self, failures: int, cause: str) -> None:
        if self.policy.over_limit(failures) and self.state == ENABLED:
            await self.change_state(DISABLED_DUE_TO_ERRORS,
                                    self.policy.limit_reason(failures, cause))

    async def change_state(self, state: str, reason: str) -> None:
        """The policy's change (410 Gone, failure_limit): written through the store's one
        ordered state path by ``on_state`` (the daemon), which applies it here."""
        if self.on_state is not None:
            await self.on_state(self.name, state, reason)
            return
        # A worker on its own: the same write, applied here.
        if await self.store.write(self.store.op_set_state(self.name, state, reason,
                                                          only_if=ENABLED)) is not None:
            self.set_state(state)


def status_notice(webhook: str, state: str, reason: str, extra: dict[str, Any] | None = None
                  ) -> bytes:
    """The retained JSON notice published on a webhook's status topic."""
    body = {"webhook": webhook, "status": state, "reason": reason,
            "ts": int(time.time() * 1000)}
    body.update(extra or {})
    return json.dumps(body, separators=(",", ":")).encode()
