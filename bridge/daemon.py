"""The daemon: wires source -> decode -> rules -> store -> dispatch, and runs them.

Owns the process lifecycle: start-up order, the per-message path (decode, match, one
``enqueue`` operation whose commit releases the MQTT ack), the queue quota's
backpressure, live reload (SIGHUP or a changed file), signals (SIGTERM/SIGINT drain and
exit 0), the embedded broker, the status notices on MQTT, and following the changes CLI
commands make to the store while the daemon runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import tracemalloc
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from . import logs
from .config import Config, ConfigError, WebhookConfig, load_config
from .delivery import USER_AGENT, Outcome, Sender
from .dispatch import WebhookWorker, status_notice
from .events import Event, dumps
from .metrics import Metrics
from .registry import DeviceChange, Registry, apply_change
from .render import Renderer
from .rules import RuleSet
from .signing import SecretKeeper
from .sources.decode import SourceDecoder
from .sources.mqtt import Message, MqttSource
from .store import ENABLED, ROW_OVERHEAD, Delivery, NewDelivery, Store, webhook_rows
from .systemd import Notifier, run_watchdog

log = structlog.get_logger("bridge.daemon")

POLL = 1.0  # seconds: how soon a change made by a CLI command or to a file takes effect
DRAIN_GRACE = 30.0
REMOVED_REASON = "webhook removed from the configuration"


def status_topic(client_id: str, webhook: str) -> str:
    return f"webhook-bridge/{client_id}/webhooks/{webhook}/status"


def _embedded_protocol(config: Config) -> Config:
    if config.mqtt.embedded and config.mqtt.protocol != "3.1.1":
        # amqtt speaks MQTT 3.1.1 only.
        return replace(config, mqtt=replace(config.mqtt, protocol="3.1.1"))
    return config


class DropReporter:
    """Counts deliveries the quota dropped; one log line when a burst starts and one
    summary when it ends, never a line per message."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.burst: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, dropped: dict[str, int]) -> None:
        for webhook, count in dropped.items():
            self.metrics.dropped.labels(webhook).inc(count)
            self.burst[webhook] = self.burst.get(webhook, 0) + count
        if self._timer is None:
            log.warning("queue full: dropping the oldest deliveries (store.overflow: "
                        "drop_oldest)", dropped=dict(self.burst))
            self._timer = asyncio.get_running_loop().call_later(10.0, self._summary)

    def _summary(self) -> None:
        log.warning("queue quota dropped deliveries", dropped=self.burst,
                    fix="raise store.max_size or fix the endpoint")
        self.burst, self._timer = {}, None


@dataclass(slots=True)
class _CommitGroup:
    """The messages whose deliveries one group commit stores."""

    future: asyncio.Future[Any]
    messages: int = 0
    size: int = 0
    changes: list[DeviceChange] = field(default_factory=list)


class Bridge:
    """One running bridge for one configuration."""

    def __init__(self, config: Config) -> None:
        config = _embedded_protocol(config)
        self.config = config
        self.store = Store(config.store.path, config.store.durability, config.store.max_size,
                           config.store.overflow)
        self.secrets = SecretKeeper(config.state_dir)
        self.metrics = Metrics()
        self.decoders = [SourceDecoder(s) for s in config.sources]
        self.rules = RuleSet(tuple(w for w in config.webhooks if w.enabled))
        self.workers: dict[str, WebhookWorker] = {}
        self.broker: Any = None
        self.admin: Any = None
        self.notifier: Any = None
        self.source = MqttSource(config.mqtt, self._filters(), self.handle)
        self._tasks: list[asyncio.Task[Any]] = []
        self._held: deque[tuple[list[NewDelivery], int, Any, asyncio.Future[Any]]] = deque()
        self.registry = Registry()
        self._event_counters: dict[tuple[str, str], Any] = {}
        self._commit_group: _CommitGroup | None = None
        self.store.on_enqueued = self._enqueued
        self._drops = DropReporter(self.metrics)
        self._generation: str | None = None
        self._in_flight_written: dict[str, int] = {}
        self._files_seen = self._config_files()
        self._reload_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.accepted = 0

    def _filters(self) -> list[tuple[str, int]]:
        best: dict[str, int] = {}
        for decoder in self.decoders:
            topic_filter, qos = decoder.topic.filter, decoder.source.qos
            best[topic_filter] = max(qos, best.get(topic_filter, 0))
        return list(best.items())

    # -- the per-message path -----------------------------------------------------------

    def handle(self, message: Message) -> asyncio.Future[Any]:
        """Decode and match ``message``; the returned future resolves once its deliveries
        are committed (the MQTT ack waits on it)."""
        self.metrics.messages_received.inc()
        events, change = self.registry.observe(self.events_of(message))
        items = self._route(events)
        size = sum(len(i.event) + ROW_OVERHEAD for i in items)
        if self._held or (items and self.config.store.overflow == "backpressure"
                          and not self.store.has_room(size) and self._queue_in_use()):
            return self._hold(items, size, change)
        return self._enqueue(items, size, change)

    def _route(self, events: list[Event]) -> list[NewDelivery]:
        """One delivery per event and matching webhook, carrying the event's JSON."""
        items: list[NewDelivery] = []
        for event in events:
            self._event_counter(event.source, event.type).inc()
            names = self.rules.match(event)
            if not names:
                continue
            body = dumps(event.envelope())
            items.extend(NewDelivery(n, event.id, event.device_id, body) for n in names)
        return items

    def _queue_in_use(self) -> bool:
        return bool(self.store.bytes_queued or self.store.bytes_pending)

    def _event_counter(self, source: str, type_: str) -> Any:
        counter = self._event_counters.get((source, type_))
        if counter is None:  # labels() takes a lock and builds a key: once per pair
            counter = self._event_counters[(source, type_)] = self.metrics.events.labels(
                source, type_)
        return counter

    def _enqueue(self, items: list[NewDelivery], size: int, change: DeviceChange
                 ) -> asyncio.Future[Any]:
        self.store.bytes_pending += size
        future = self.store.enqueue(items, _registry_op(change) if change else None)
        # Messages stored by one commit share its future: account for them together.
        group = self._commit_group
        if group is None or group.future is not future:
            group = self._commit_group = _CommitGroup(future)
            future.add_done_callback(lambda f, g=group: self._committed(f, g))
        group.messages += 1
        group.size += size
        if change:
            group.changes.append(change)
        return future

    def _committed(self, future: asyncio.Future[Any], group: _CommitGroup) -> None:
        if self._commit_group is group:
            self._commit_group = None
        self.store.bytes_pending -= group.size
        if future.cancelled() or future.exception() is not None:
            for change in reversed(group.changes):
                self.registry.revert(change)  # the redelivery must see the device as new
            self.metrics.messages_rejected.inc(group.messages)
            log.error("messages not stored; the broker will send them again",
                      messages=group.messages, cause=str(future.exception()))
            return
        self.metrics.messages_accepted.inc(group.messages)
        self.accepted += group.messages

    def _enqueued(self, dropped: dict[str, int], handed: list[Delivery]) -> None:
        """After each commit that queued deliveries (the store has already handed caught-up
        workers their new rows): count drops and wake the workers."""
        if dropped:
            self._drops.add(dropped)
        for worker in self.workers.values():
            worker.wake()

    def _hold(self, items: list[NewDelivery], size: int, change: DeviceChange
              ) -> asyncio.Future[Any]:
        """Backpressure: keep the message unacknowledged until the queue has room, so the
        broker holds the rest (it stops sending once our receive window is full)."""
        if not self._held:
            log.warning("queue full: holding MQTT acknowledgements until deliveries free "
                        "room (store.overflow: backpressure)",
                        queued_bytes=self.store.bytes_queued, max_size=self.store.max_size)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._held.append((items, size, change, future))
        return future

    async def _release_held(self) -> None:
        while True:
            await self.store.space_freed.wait()
            self.store.space_freed.clear()
            released = 0
            while self._held and (self.store.has_room(self._held[0][1])
                                  or not self._queue_in_use()):
                items, size, change, held = self._held.popleft()
                _chain(self._enqueue(items, size, change), held)
                released += 1
            if released and not self._held:
                log.info("queue has room again: acknowledging MQTT messages")

    def events_of(self, message: Message) -> list[Event]:
        events: list[Event] = []
        for decoder in self.decoders:
            captures = decoder.topic.match(message.topic)
            if captures is not None:
                events.extend(decoder.events(message.topic, message.payload, captures))
        return events

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        if self.config.admin.listen is not None:
            from .admin import AdminServer

            self.admin = AdminServer(self)
            try:
                await self.admin.start()
            except OSError as exc:
                raise StartError(f"admin server cannot listen on "
                                 f"{self.config.admin.listen}: {exc.strerror or exc}; "
                                 "change admin.listen or stop what uses that port") from exc
        await self.store.read(self.registry.load)
        if self.config.mqtt.embedded:
            await self._start_embedded_broker()
        states = await self.store.read(webhook_rows)
        for webhook in self.config.webhooks:
            if webhook.enabled:
                self._start_worker(webhook, states.get(webhook.name, {}).get("state", ENABLED))
        self._tasks.append(asyncio.create_task(self._watch(), name="watch"))
        self._tasks.append(asyncio.create_task(self._release_held(), name="backpressure"))
        self._tasks.append(asyncio.create_task(self._expire_registrations(),
                                               name="lifetimes"))
        self._tasks.append(self.source.start())
        log.info("bridge started", sources=len(self.decoders), webhooks=len(self.workers),
                 store=self.config.store.path)

    def _start_worker(self, webhook: WebhookConfig, state: str) -> None:
        sender = Sender(webhook, self.secrets)
        sender.start_nowait()
        worker = WebhookWorker(webhook, self.store, sender, Renderer(webhook, USER_AGENT),
                               state=state, on_state=self._publish_state,
                               metrics=self.metrics)
        self.workers[webhook.name] = worker
        self.metrics.set_state(webhook.name, state)
        worker.task = asyncio.create_task(worker.run(), name=f"worker-{webhook.name}")
        if state != ENABLED:
            log.warning("webhook is not enabled", webhook=webhook.name, state=state,
                        fix=f"webhook-bridge enable {webhook.name}")

    async def _stop_worker(self, name: str) -> None:
        worker = self.workers.pop(name)
        await worker.stop(worker.webhook.timeout + 5)
        worker.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker.task
        await worker.sender.close()

    async def _publish_state(self, webhook: str, state: str, reason: str) -> None:
        self.metrics.set_state(webhook, state)
        await self.source.publish(status_topic(self.config.mqtt.client_id, webhook),
                                  status_notice(webhook, state, reason))

    async def set_webhook_state(self, name: str, state: str,
                                reason: str = "changed via API") -> None:
        """Persist ``state`` for webhook ``name``, apply it and publish the notice."""
        worker = self.workers.get(name)
        if worker is not None:
            await worker.change_state(state, reason)
        else:
            await self.store.write(self.store.op_set_state(name, state))

    async def _watch(self) -> None:
        """Once a second: follow what CLI commands changed in the store, record the
        attempts in flight for ``status``, and reload when a config file changed."""
        while True:
            await asyncio.sleep(POLL)
            try:
                await self._follow_store()
                await self._record_in_flight()
                if self._config_files() != self._files_seen:
                    await self.reload_logged("a configuration file changed")
            except Exception as exc:  # keep watching whatever happens
                log.error("watch failed", cause=f"{type(exc).__name__}: {exc}")

    async def _follow_store(self) -> None:
        generation = await self.store.read(Store.q_generation)
        if generation == self._generation:
            return
        self._generation = generation
        await self.store.remeasure()
        await self.store.read(self.registry.load)  # a device deleted by a command
        self.store.space_freed.set()
        rows = await self.store.read(webhook_rows)
        for name, worker in self.workers.items():
            state = rows.get(name, {}).get("state", ENABLED)
            if state != worker.state:
                log.info("webhook state changed by command", webhook=name, state=state)
                worker.set_state(state)
                await self._publish_state(name, state, "changed by command")
            worker.resync()  # dead letters replayed by a command are due now

    async def _expire_registrations(self) -> None:
        """LwM2M registrations whose lifetime passed with no update: deregistered."""
        while True:
            deadline = self.registry.next_deadline()
            delay = POLL if deadline is None else min(max(deadline - time.time(), 0.0), POLL)
            await asyncio.sleep(delay)
            events, change = self.registry.expire(time.time())
            if events:
                items = self._route(events)
                size = sum(len(i.event) + ROW_OVERHEAD for i in items)
                await self._enqueue(items, size, change)
                log.info("lwm2m registrations expired", devices=[e.device_id for e in events])

    async def _record_in_flight(self) -> None:
        counts = {name: len(w.in_flight) for name, w in self.workers.items()}
        if counts != self._in_flight_written:
            await self.store.write(self.store.op_in_flight(counts))
            self._in_flight_written = counts

    # -- reload -----------------------------------------------------------------------

    def _config_files(self) -> dict[str, float]:
        main = self.config.path
        directory = os.path.join(os.path.dirname(os.path.abspath(main)), "conf.d")
        paths = [main]
        with contextlib.suppress(OSError):
            paths += [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                      if n.endswith(".yaml")]
        seen = {}
        for path in paths:
            with contextlib.suppress(OSError):
                seen[path] = os.stat(path).st_mtime
        return seen

    async def reload_logged(self, why: str) -> bool:
        """Reload, logging (not raising) a bad configuration; True when applied."""
        try:
            await self.reload()
        except ConfigError as error:
            log.error("configuration not reloaded; still running the previous one",
                      why=why, problems=error.problems)
            return False
        log.info("configuration reloaded", why=why, webhooks=len(self.workers))
        return True

    async def reload(self) -> None:
        """Re-read the configuration from disk and apply it live; raise ConfigError and
        keep the running configuration when the new one is bad."""
        async with self._reload_lock:
            self._files_seen = self._config_files()
            if self.notifier is not None:
                self.notifier.reloading()
            try:
                new = _embedded_protocol(load_config(self.config.path))
                await self._apply(new)
            finally:
                if self.notifier is not None:
                    self.notifier.ready("reloaded")

    async def _apply(self, new: Config) -> None:
        old = self.config
        for key in ("mqtt", "store", "admin", "log"):
            if getattr(old, key) != getattr(new, key):
                log.warning("this section changes only on restart", section=key)
        new = replace(new, mqtt=old.mqtt, store=old.store, admin=old.admin, log=old.log)
        logs.register_secrets(logs.config_secrets(new))
        before = {w.name: w for w in old.webhooks if w.enabled}
        after = {w.name: w for w in new.webhooks if w.enabled}
        # New rules first: from now on messages are matched against the new webhooks;
        # a removed webhook's worker still drains what it had in flight.
        self.config = new
        self.decoders = [SourceDecoder(s) for s in new.sources]
        self.rules = RuleSet(tuple(after.values()))
        states = await self.store.read(webhook_rows)
        for name in before:
            if name not in after or before[name] != after[name]:
                await self._stop_worker(name)
        for name, webhook in after.items():
            if name not in self.workers:
                self._start_worker(webhook, states.get(name, {}).get("state", ENABLED))
        gone = {w.name for w in old.webhooks} - {w.name for w in new.webhooks}
        for name in gone:
            count = await self.store.write(self.store.op_dead_all(name, REMOVED_REASON))
            # No status row, no metrics series, no retained notice for a webhook that
            # no longer exists (its dead letters stay until purged).
            await self.store.write(self.store.op_forget_webhook(name))
            await self.source.publish(status_topic(self.config.mqtt.client_id, name), b"")
            self.metrics.forget(name)
            if count:
                log.warning("queued deliveries of a removed webhook moved to the dead "
                            "letters", webhook=name, count=count)
        await self.source.set_filters(self._filters())

    # -- the rest -----------------------------------------------------------------------

    async def test_send(self, name: str, event: Event) -> Outcome:
        """Send ``event`` through webhook ``name`` now, outside the queue."""
        webhook = self.config.webhook(name)
        if webhook is None:
            raise KeyError(name)
        sender = Sender(webhook, self.secrets)
        sender.start_nowait()
        try:
            request = Renderer(webhook, USER_AGENT).render([event])
            return await sender.send(request, event.id)
        finally:
            await sender.close()

    def alive(self) -> bool:
        """The stages are running (the systemd watchdog pings only while this holds).
        A failed store is not death: restarting would not free a full disk."""
        tasks = [*self._tasks, *(w.task for w in self.workers.values())]
        return all(t is not None and not t.done() for t in tasks)

    def status_text(self) -> str:
        mqtt = "connected" if self.source.connected.is_set() else "connecting"
        queued = self.store.bytes_queued
        return (f"mqtt {mqtt}; {len(self.workers)} webhooks; queue {queued} B; "
                f"{self.accepted} messages accepted")

    @property
    def ready(self) -> bool:
        """Connected to the broker and the store writable (``/readyz``)."""
        return self.source.connected.is_set() and not self.store.failed

    async def _start_embedded_broker(self) -> None:
        from amqtt.broker import Broker

        cfg = self.config.mqtt
        self.broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"{cfg.host}:{cfg.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        })
        await self.broker.start()
        log.info("embedded broker started", host=cfg.host, port=cfg.port)

    async def stop(self) -> None:
        """Stop taking messages, commit and ack what was taken, finish attempts in flight,
        close everything. Nothing is lost: unacked messages stay with the broker, and
        unfinished deliveries stay queued."""
        log.info("bridge stopping")
        if self.admin is not None:
            await self.admin.stop()
        await self.source.stop(drain=lambda: self.store.write(lambda conn: None))
        await asyncio.gather(*(w.stop(DRAIN_GRACE) for w in self.workers.values()))
        for task in [*self._tasks, *(w.task for w in self.workers.values())]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers.values():
            await worker.sender.close()
        await self.store.close()
        if self.broker is not None:
            await self.broker.shutdown()
        self.stopped.set()
        log.info("bridge stopped")


def _registry_op(change: DeviceChange) -> Any:
    return lambda conn: apply_change(conn, change, time.time())


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    def copy(done: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


def _log_allocations() -> None:
    top = tracemalloc.take_snapshot().statistics("lineno")[:15]
    log.warning("memory", top=[str(stat) for stat in top])


class StartError(Exception):
    """The bridge cannot start (reported as one line, exit 1)."""


async def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Speaks the systemd notify protocol
    (READY, STATUS, WATCHDOG, RELOADING, STOPPING). Return the exit code."""
    bridge = Bridge(config)
    bridge.notifier = notifier = Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(
        bridge.reload_logged("SIGHUP")))
    if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N: SIGUSR2 logs the top allocations
        loop.add_signal_handler(signal.SIGUSR2, _log_allocations)
    started = time.monotonic()
    await bridge.start()
    notifier.ready(bridge.status_text())
    watchdog = asyncio.create_task(run_watchdog(notifier, bridge.alive, bridge.status_text))
    await stop.wait()
    notifier.stopping()
    watchdog.cancel()
    await bridge.stop()
    notifier.close()
    log.info("exit", uptime_s=round(time.monotonic() - started, 1))
    return 0
