"""Dispatch: when each webhook's queued deliveries are attempted, and what follows.

Owns one :class:`WebhookWorker` per webhook: it pulls due deliveries from the store, keeps
``concurrency`` requests in flight, and applies the policy of SPEC §5. Backoff is per
webhook, not per delivery: after a retryable failure the webhook pauses for one backoff
step (exponential with full jitter, stretched by ``Retry-After``), then sends a single
probe (its oldest due delivery); a success resumes full concurrency. So a failing endpoint
sees one request per step however long the queue. Consecutive HTTP-level failures past
``failure_limit`` disable the webhook (persisted); its deliveries stay queued.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .config import WebhookConfig
from .delivery import DEAD, DELIVERED, GONE, Outcome, Sender
from .events import Event, new_id
from .render import Renderer, RenderError
from .store import DISABLED, DISABLED_DUE_TO_ERRORS, ENABLED, Delivery, Store

log = structlog.get_logger("bridge.dispatch")

StateListener = Callable[[str, str, str], Awaitable[None]]  # webhook, state, reason


class WebhookWorker:
    """Delivers one webhook's queue; see the module docstring for the policy."""

    def __init__(self, webhook: WebhookConfig, store: Store, sender: Sender,
                 renderer: Renderer, state: str = ENABLED,
                 on_state: StateListener | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.webhook = webhook
        self.name = webhook.name
        self.store = store
        self.sender = sender
        self.renderer = renderer
        self.state = state
        self.on_state = on_state
        self.clock = clock
        self.in_flight: set[int] = set()
        self._ready: deque[Delivery] = deque()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._step = 0
        self._paused_until = 0.0
        self._pause_started = 0.0
        self._probing = False
        self.attempts_started = 0

    # -- control --------------------------------------------------------------------------

    def wake(self) -> None:
        """New deliveries were committed, or something else changed: look again."""
        self._changed.set()

    def set_state(self, state: str) -> None:
        if state == ENABLED and self.state != ENABLED:
            self._step, self._paused_until, self._probing = 0, 0.0, False
        self.state = state
        self._ready.clear()
        self.wake()

    async def stop(self, grace: float) -> None:
        """Take no new work; let attempts in flight finish (their outcome is committed)."""
        self._stopping = True
        self.wake()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    @property
    def capacity(self) -> int:
        limit = 1 if self._probing else self.webhook.concurrency
        return limit - len(self.in_flight)

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
        """Start what may start now; return how long to wait at most before looking again."""
        if self.state != ENABLED:
            return None
        now = self.clock()
        if now < self._paused_until:
            return self._paused_until - now
        while self.capacity > 0 and not self._stopping:
            if not self._ready:
                await self._refill(now)
                if not self._ready:
                    return await self._until_next_due()
            row = self._ready.popleft()
            if row.id in self.in_flight:
                continue
            self._start(row)
        return None

    async def _refill(self, now: float) -> None:
        want = max(self.webhook.concurrency * 8, 16)
        rows = await self.store.read(Store.q_due(self.name, now, want, set(self.in_flight)))
        self._ready.extend(rows)

    async def _until_next_due(self) -> float | None:
        exclude = set(self.in_flight)
        due = await self.store.read(Store.q_next_due(self.name, exclude))
        if due is None:
            return None
        return max(due - self.clock(), 0.05)

    def _start(self, row: Delivery) -> None:
        self.in_flight.add(row.id)
        self.attempts_started += 1
        task = asyncio.create_task(self._attempt(row), name=f"deliver-{self.name}-{row.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, row: Delivery) -> None:
        started = self.clock()
        try:
            await self._attempt_one(row, started)
        except Exception as exc:
            log.error("delivery crashed", webhook=self.name, event_id=row.event_id,
                      cause=f"{type(exc).__name__}: {exc}")
        finally:
            self.in_flight.discard(row.id)
            self.wake()

    async def _attempt_one(self, row: Delivery, started: float) -> None:
        webhook = self.webhook
        if started - row.created > webhook.retry.max_age:
            await self._dead(row, f"older than retry.max_age ({webhook.retry.max_age:g}s)",
                             None, None, attempted=False)
            return
        try:
            event = Event.from_envelope(json.loads(row.event))
            request = self.renderer.render([event])
        except (RenderError, ValueError, KeyError) as exc:
            await self._dead(row, f"cannot render the request: {exc}", None, None,
                             attempted=False)
            return
        outcome = await self.sender.send(request, row.event_id)
        now = self.clock()
        if outcome.kind == DELIVERED:
            self._step, self._probing = 0, False
            await self.store.write(self.store.op_delivered(self.name, [row.id], now))
            return
        if outcome.kind == DEAD:
            await self._dead(row, outcome.cause, outcome.status, outcome.response,
                             counts=outcome.counts_as_failure)
            return
        failures = await self.store.write(self.store.op_retry(
            self.name, [row.id], None, outcome.status, outcome.cause,
            outcome.counts_as_failure, now))
        delay = self._back_off(started, now, outcome)
        log.warning("delivery failed", webhook=self.name, event_id=row.event_id,
                    attempt=row.attempts + 1, status=outcome.status, cause=outcome.cause,
                    retry_in=round(delay, 3))
        if outcome.kind == GONE:
            await self.change_state(DISABLED, outcome.cause)
        elif self._over_limit(failures):
            await self.change_state(
                DISABLED_DUE_TO_ERRORS,
                f"{failures} consecutive failures (failure_limit {webhook.failure_limit}); "
                f"last: {outcome.cause}")

    def _back_off(self, started: float, now: float, outcome: Outcome) -> float:
        """Pause the webhook for the next backoff step. An attempt that was already in
        flight when the current pause began does not lengthen it again."""
        self._ready.clear()  # the next attempt is a probe of the oldest due delivery
        self._probing = True
        if started < self._pause_started:
            return max(self._paused_until - now, 0.0)
        self._step += 1
        retry = self.webhook.retry
        ceiling = min(retry.max, retry.initial * 2 ** (self._step - 1))
        delay = random.uniform(0, ceiling)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        self._pause_started = now
        self._paused_until = now + delay
        return delay

    def _over_limit(self, failures: int) -> bool:
        limit = self.webhook.failure_limit
        return limit > 0 and failures >= limit and self.state == ENABLED

    async def _dead(self, row: Delivery, reason: str, status: int | None,
                    response: str | None, attempted: bool = True, counts: bool = False
                    ) -> None:
        failures = await self.store.write(self.store.op_dead(
            self.name, [row.id], reason, status, response, self.clock(), attempted, counts))
        log.warning("delivery dead-lettered", webhook=self.name, event_id=row.event_id,
                    attempt=row.attempts + (1 if attempted else 0), status=status,
                    cause=reason)
        if attempted and self._over_limit(failures):
            await self.change_state(
                DISABLED_DUE_TO_ERRORS,
                f"{failures} consecutive failures (failure_limit "
                f"{self.webhook.failure_limit}); last: {reason}")

    async def change_state(self, state: str, reason: str) -> None:
        if state == self.state:
            return
        self.set_state(state)
        await self.store.write(self.store.op_set_state(self.name, state, reason))
        log.error("webhook state changed", webhook=self.name, state=state, cause=reason) \
            if state != ENABLED else log.info("webhook enabled", webhook=self.name)
        if self.on_state is not None:
            await self.on_state(self.name, state, reason)


def status_notice(webhook: str, state: str, reason: str, extra: dict[str, Any] | None = None
                  ) -> bytes:
    """The retained JSON notice published on a webhook's status topic."""
    body = {"webhook": webhook, "status": state, "reason": reason,
            "ts": int(time.time() * 1000), "id": new_id("ntc_")}
    body.update(extra or {})
    return json.dumps(body, separators=(",", ":")).encode()
