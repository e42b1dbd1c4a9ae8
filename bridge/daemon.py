"""The daemon: wires source -> decode -> rules -> store -> dispatch, and runs them.

Owns the process lifecycle: start-up order, the per-message path (decode, match, one
``enqueue`` operation whose commit releases the MQTT ack), signals (SIGTERM/SIGINT drain
and exit 0), the embedded broker, the status notices on MQTT, and picking up state
changes that CLI commands write to the store while the daemon runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from dataclasses import replace
from typing import Any

import structlog

from .config import Config, WebhookConfig
from .delivery import USER_AGENT, Outcome, Sender
from .dispatch import WebhookWorker, status_notice
from .events import Event
from .metrics import Metrics
from .render import Renderer
from .rules import RuleSet
from .signing import SecretKeeper
from .sources.decode import SourceDecoder
from .sources.mqtt import Message, MqttSource
from .store import ENABLED, NewDelivery, Store, webhook_rows

log = structlog.get_logger("bridge.daemon")

STATE_POLL = 1.0  # seconds: how soon a state change made by a CLI command takes effect
DRAIN_GRACE = 30.0


def status_topic(client_id: str, webhook: str) -> str:
    return f"webhook-bridge/{client_id}/webhooks/{webhook}/status"


class Bridge:
    """One running bridge for one configuration."""

    def __init__(self, config: Config) -> None:
        if config.mqtt.embedded and config.mqtt.protocol != "3.1.1":
            # amqtt speaks MQTT 3.1.1 only.
            config = replace(config, mqtt=replace(config.mqtt, protocol="3.1.1"))
        self.config = config
        self.store = Store(config.store.path, config.store.durability)
        self.secrets = SecretKeeper(config.state_dir)
        self.decoders = [SourceDecoder(s) for s in config.sources]
        enabled = tuple(w for w in config.webhooks if w.enabled)
        self.rules = RuleSet(enabled)
        self.workers: dict[str, WebhookWorker] = {}
        self.broker: Any = None
        filters = [(d.topic.filter, d.source.qos) for d in self.decoders]
        self.source = MqttSource(config.mqtt, _unique(filters), self.handle)
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopped = asyncio.Event()
        self.events_accepted = 0
        self.metrics = Metrics()
        self.admin: Any = None

    # -- what the admin server and systemd notify read ---------------------------------

    @property
    def ready(self) -> bool:
        """Connected to the broker and the store writable (``/readyz``)."""
        return self.source.connected.is_set() and not self.store.failed

    async def reload(self) -> None:
        """Re-read the configuration from disk and apply it live; raise ConfigError and
        keep the running configuration when the new one is bad."""
        raise NotImplementedError

    async def test_send(self, name: str, event: Event) -> Outcome:
        """Send ``event`` through webhook ``name`` now, outside the queue."""
        webhook = self.config.webhook(name)
        if webhook is None:
            raise KeyError(name)
        sender = Sender(webhook, self.secrets)
        await sender.start()
        try:
            request = Renderer(webhook, USER_AGENT).render([event])
            return await sender.send(request, event.id)
        finally:
            await sender.close()

    # -- the per-message path -----------------------------------------------------------

    def handle(self, message: Message) -> asyncio.Future[Any]:
        """Decode and match ``message``; the returned future resolves once its deliveries
        are committed (the MQTT ack waits on it)."""
        items: list[NewDelivery] = []
        targets: set[str] = set()
        for event in self.events_of(message):
            names = self.rules.match(event)
            if not names:
                continue
            body = json.dumps(event.envelope(), separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8")
            items.extend(NewDelivery(n, event.id, event.device_id, body) for n in names)
            targets.update(names)
        future = self.store.submit(self.store.op_enqueue(items))
        if targets:
            self.events_accepted += 1
            future.add_done_callback(lambda f: self._wake(targets) if not f.exception()
                                     else None)
        return future

    def events_of(self, message: Message) -> list[Event]:
        events: list[Event] = []
        for decoder in self.decoders:
            captures = decoder.topic.match(message.topic)
            if captures is not None:
                events.extend(decoder.events(message.topic, message.payload, captures))
        return events

    def _wake(self, names: set[str]) -> None:
        for name in names:
            worker = self.workers.get(name)
            if worker is not None:
                worker.wake()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        if self.config.mqtt.embedded:
            await self._start_embedded_broker()
        states = await self.store.read(webhook_rows)
        for webhook in self.config.webhooks:
            if webhook.enabled:
                state = states.get(webhook.name, {}).get("state", ENABLED)
                await self._start_worker(webhook, state)
        self._tasks.append(asyncio.create_task(self._watch_states(), name="state-watch"))
        self._tasks.append(self.source.start())
        log.info("bridge started", sources=len(self.decoders), webhooks=len(self.workers),
                 store=self.config.store.path)

    async def _start_worker(self, webhook: WebhookConfig, state: str) -> None:
        sender = Sender(webhook, self.secrets)
        await sender.start()
        worker = WebhookWorker(webhook, self.store, sender, Renderer(webhook, USER_AGENT),
                               state=state, on_state=self._publish_state)
        self.workers[webhook.name] = worker
        self._tasks.append(asyncio.create_task(worker.run(), name=f"worker-{webhook.name}"))
        if state != ENABLED:
            log.warning("webhook is not enabled", webhook=webhook.name, state=state,
                        fix=f"webhook-bridge enable {webhook.name}")

    async def _publish_state(self, webhook: str, state: str, reason: str) -> None:
        await self.source.publish(status_topic(self.config.mqtt.client_id, webhook),
                                  status_notice(webhook, state, reason))

    async def _watch_states(self) -> None:
        """Apply states that CLI commands changed in the store; nudge idle workers so
        deliveries re-queued from the dead letters go out."""
        while True:
            await asyncio.sleep(STATE_POLL)
            try:
                rows = await self.store.read(webhook_rows)
            except Exception as exc:  # keep watching
                log.error("cannot read webhook states", cause=str(exc))
                continue
            for name, worker in self.workers.items():
                state = rows.get(name, {}).get("state", ENABLED)
                if state != worker.state:
                    log.info("webhook state changed by command", webhook=name, state=state)
                    worker.set_state(state)
                    await self._publish_state(name, state, "changed by command")
                else:
                    worker.wake()

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
        await self.source.stop(drain=lambda: self.store.write(lambda conn: None))
        await asyncio.gather(*(w.stop(DRAIN_GRACE) for w in self.workers.values()))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for worker in self.workers.values():
            await worker.sender.close()
        await self.store.close()
        if self.broker is not None:
            await self.broker.shutdown()
        self.stopped.set()
        log.info("bridge stopped")


def _unique(filters: list[tuple[str, int]]) -> list[tuple[str, int]]:
    best: dict[str, int] = {}
    for topic_filter, qos in filters:
        best[topic_filter] = max(qos, best.get(topic_filter, 0))
    return list(best.items())


async def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    bridge = Bridge(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    await bridge.start()
    await stop.wait()
    await bridge.stop()
    log.info("exit", uptime_s=round(time.monotonic() - started, 1))
    return 0
