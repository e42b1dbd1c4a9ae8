"""The daemon: wires source -> ingest -> store -> dispatch, and runs them.

Owns the process lifecycle: start-up order, wiring the MQTT source to the ingest path
(:mod:`bridge.ingest`: decode, registry, match, enqueue, backpressure) and the store's
commits to the webhook workers, live reload (SIGHUP or a changed file), signals
(SIGTERM/SIGINT drain and exit 0), the embedded broker, the status notices on MQTT,
and following the changes CLI commands make to the store while the daemon runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from . import clock as queue_clock
from . import logs, store_check, testsend
from .config import Config, ConfigError, WebhookConfig, load_config
from .delivery import USER_AGENT, Outcome, Sender
from .dispatch import WebhookWorker, status_notice
from .errors import ChangeError, StartError
from .events import Event
from .ingest import Ingest
from .metrics import Metrics
from .registry import Registry, max_devices
from .render import Renderer
from .rules import RuleSet
from .signing import SecretKeeper
from .sources.decode import SourceDecoder
from .sources.mqtt import MqttSource
from .store import (
    ENABLED,
    Delivery,
    Store,
    prune_dead_letters,
    webhook_rows,
    write_failed_change,
)
from .systemd import Notifier, run_watchdog
from .wear import WearMeter

log = structlog.get_logger("bridge.daemon")

POLL = 1.0  # seconds: how soon a change to a file takes effect
# Seconds between two looks at the registrations' deadlines when none is due sooner.
LIFETIME_RECHECK = 60.0
PRUNE_EVERY = 10.0  # seconds between two checks of the dead letters' bound
DRAIN_GRACE = 30.0
CLOCK_STEP = 2.0  # seconds: a larger change of wall minus queue time is a clock step
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


class Bridge:
    """One running bridge for one configuration."""

    def __init__(self, config: Config) -> None:
        config = _embedded_protocol(config)
        self.config = config
        # Damage found at open: one line and exit 1, or moved aside (store.on_damage).
        damage = store_check.check(config.store.path, store_check.OnDamage(
            config.store.on_damage))
        self.store = Store(config.store.path, config.store.durability, config.store.max_size,
                           config.store.overflow, config.store.commit_window)
        if damage is not None:
            store_check.record(config.store.path, damage)
        store_check.mark(config.store.path)
        self.secrets = SecretKeeper(config.state_dir)
        self.metrics = Metrics()
        self.metrics.store_damaged.set(1 if damage is not None else 0)
        self.decoders = [SourceDecoder(s) for s in config.sources]
        self.registry = Registry(max_devices(config.store.max_size))
        self.ingest = Ingest(self.decoders, RuleSet(tuple(w for w in config.webhooks
                                                          if w.enabled)),
                             self.registry, self.store, self.metrics,
                             backpressure=config.store.overflow == "backpressure")
        self.workers: dict[str, WebhookWorker] = {}
        self.broker: Any = None
        self.admin: Any = None
        self.notifier: Any = None
        self.source = MqttSource(config.mqtt, self._filters(), self.ingest.take,
                                 pace=self.store.intake_pace)
        self.source.on_connected = self.metrics.mqtt_connects.inc
        # Redelivery (SPEC §5): the store remembers committed packet ids until acked.
        self.source.on_acked = self.store.acked
        self.source.on_session = self._mqtt_session
        self._tasks: list[asyncio.Task[Any]] = []
        self.store.on_enqueued = self._enqueued
        self.store.on_full = self._store_full
        self.wear = WearMeter()
        self._skew = self.store.clock.wall_skew()
        self._full_since: float | None = None
        self._drops = DropReporter(self.metrics)
        self._generation: str | None = None
        self._in_flight_written: dict[str, int] = {}
        self._files_seen = self._config_files()
        self._reload_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.failed_change: dict[str, Any] | None = None
        # The state version (store.write_state) each webhook's worker runs with.
        self._state_versions: dict[str, int] = {}

    @property
    def accepted(self) -> int:
        return self.ingest.accepted

    @property
    def rules(self) -> RuleSet:
        return self.ingest.rules

    def _filters(self) -> list[tuple[str, int]]:
        best: dict[str, int] = {}
        for decoder in self.decoders:
            topic_filter, qos = decoder.topic.filter, decoder.source.qos
            best[topic_filter] = max(qos, best.get(topic_filter, 0))
        return list(best.items())

    # -- commits to workers --------------------------------------------------------------

    def _enqueued(self, dropped: dict[str, int], handed: list[Delivery]) -> None:
        """After each commit that queued deliveries (the store has already handed caught-up
        workers their new rows): count drops and wake the workers."""
        if dropped:
            self._drops.add(dropped)
        for worker in self.workers.values():
            worker.wake()

    def _mqtt_session(self, present: bool) -> None:
        if not present:
            self.store.new_session()

    def _store_full(self, full: bool, cause: str) -> None:
        """The disk is full (or resumed): pause MQTT intake, keeping the connection; the
        store retries its commits with backoff and nothing is acked or sent meanwhile."""
        self.source.pause_intake(full)
        self.metrics.intake_paused.set(1 if full else 0)
        if full:
            self._full_since = time.monotonic()
            self.metrics.intake_pauses.inc()
            log.error("queue database cannot be written (disk full?): MQTT intake paused, "
                      "retrying the commit with backoff", cause=cause,
                      fix="free space on the store's filesystem; the bridge resumes on its own")
        else:
            paused = time.monotonic() - (self._full_since or time.monotonic())
            log.info("queue database writable again: MQTT intake resumed",
                     paused_s=round(paused, 1))

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
        self.ingest.sync_quota()
        if self.config.mqtt.embedded:
            await self._start_embedded_broker()
        # This configuration loaded in full: a change that failed before is moot.
        await self.store.write(lambda conn: write_failed_change(conn, None))
        states = await self.store.read(webhook_rows)
        for webhook in self.config.webhooks:
            if webhook.enabled:
                self._start_worker(webhook, states.get(webhook.name, {}))
        self._tasks.append(asyncio.create_task(self._watch(), name="watch"))
        self._tasks.append(asyncio.create_task(self.ingest.release_held(),
                                               name="backpressure"))
        self._tasks.append(asyncio.create_task(self._expire_registrations(),
                                               name="lifetimes"))
        self._tasks.append(self.source.start())
        log.info("bridge started", sources=len(self.decoders), webhooks=len(self.workers),
                 store=self.config.store.path)

    def _build(self, webhook: WebhookConfig) -> tuple[Sender, Renderer]:
        """A webhook's sender (TLS contexts loaded now) and renderer; raises when they
        cannot be made (a CA or key file that does not load)."""
        sender = Sender(webhook, self.secrets)
        sender.start_nowait()
        return sender, Renderer(webhook, USER_AGENT)

    def _start_worker(self, webhook: WebhookConfig, row: dict[str, Any],
                      built: tuple[Sender, Renderer] | None = None) -> None:
        """Start webhook's worker in the state its store ``row`` holds."""
        state = str(row.get("state", ENABLED))
        sender, renderer = built or self._build(webhook)
        worker = WebhookWorker(webhook, self.store, sender, renderer,
                               state=state, on_state=self._policy_state,
                               metrics=self.metrics)
        self.workers[webhook.name] = worker
        self._state_versions[webhook.name] = max(int(row.get("state_version") or 0),
                                                 self._state_versions.get(webhook.name, 0))
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

    async def _publish_state(self, webhook: str, state: str, reason: str,
                             version: int | None = None) -> None:
        self.metrics.set_state(webhook, state)
        extra = {"version": version} if version is not None else None
        await self.source.publish(status_topic(self.config.mqtt.client_id, webhook),
                                  status_notice(webhook, state, reason, extra))

    # -- webhook state: one truth, in the store -------------------------------------------
    # Every change (API, CLI, failure policy) is written by store.write_state, which gives
    # it the next state version; the daemon applies a change only when its version is
    # newer than the one the worker runs with. So whichever writer came last wins, even
    # when an older change is read back (from the follow below) after a newer one.

    async def set_webhook_state(self, name: str, state: str,
                                reason: str = "changed via API") -> None:
        """Persist ``state`` for webhook ``name`` (the last writer wins), apply it and
        publish the notice."""
        version = await self.store.write(self.store.op_set_state(name, state))
        await self._apply_state(name, state, version, reason)

    async def _policy_state(self, name: str, state: str, reason: str) -> None:
        """The failure policy's change (410 Gone, failure_limit): made only while the
        stored state is still ENABLED (an operator's later change stands)."""
        version = await self.store.write(self.store.op_set_state(name, state, reason,
                                                                 only_if=ENABLED))
        if version is not None:
            await self._apply_state(name, state, version, reason)

    async def _apply_state(self, name: str, state: str, version: int, reason: str) -> None:
        if version <= self._state_versions.get(name, 0):
            return  # an older change than the one applied (or the same one again)
        self._state_versions[name] = version
        worker = self.workers.get(name)
        if worker is None:
            return  # not running ('enabled: false' in its file): nothing to apply
        worker.set_state(state)
        if state == ENABLED:
            log.info("webhook enabled", webhook=name, cause=reason, version=version)
        elif reason.startswith("changed "):
            log.info("webhook disabled", webhook=name, state=state, cause=reason,
                     version=version)
        else:
            log.error("webhook disabled", webhook=name, state=state, cause=reason,
                      version=version, fix=f"webhook-bridge enable {name}")
        await self._publish_state(name, state, reason, version)

    async def _watch(self) -> None:
        """Once a second: follow what CLI commands changed in the store, record the
        attempts in flight for ``status``, keep the dead letters within their bound, and
        reload when a config file changed. One timer for all of it: on a small gateway
        every wake-up of an idle process costs more than the work it does."""
        pruned_at = 0.0
        while True:
            await asyncio.sleep(POLL)
            try:
                if time.monotonic() - pruned_at >= PRUNE_EVERY:
                    pruned_at = time.monotonic()
                    await self.prune_dead_letters()
                try:  # on its own: a failure here must not stop the rest of the watch
                    await self._follow_store()
                except Exception as exc:
                    log.error("following the store failed",
                              cause=f"{type(exc).__name__}: {exc}")
                await self._record_in_flight()
                self._record_wear()
                if self._config_files() != self._files_seen:
                    await self.reload_logged("a configuration file changed")
            except Exception as exc:  # keep watching whatever happens
                log.error("watch failed", cause=f"{type(exc).__name__}: {exc}")

    async def prune_dead_letters(self) -> None:
        """Delete the dead letters past store.dead_letters (max_age, then the oldest
        beyond max_size): an endpoint that rejects everything cannot fill the disk."""
        bound = self.config.store.dead_letters
        pruned = await self.store.write(lambda conn: prune_dead_letters(
            conn, bound.max_age, bound.max_size, time.time()))
        if pruned:
            for webhook, count in pruned.items():
                self.metrics.dead_letters_pruned.labels(webhook).inc(count)
            log.warning("dead letters deleted to stay within store.dead_letters",
                        deleted=pruned, max_age_s=bound.max_age, max_size=bound.max_size,
                        fix="replay or purge dead letters sooner, or raise the bound")

    async def _follow_store(self) -> None:
        """Apply what CLI commands changed in the store (webhook states, replayed dead
        letters, deleted devices): they bump its generation."""
        generation = self.store.generation()
        if generation == self._generation:
            return
        self._generation = generation
        await self.store.remeasure()
        await self.store.read(self.registry.load)  # a device deleted by a command
        self.ingest.sync_quota()
        self.store.space_freed.set()
        rows = await self.store.read(webhook_rows)
        for name in list(self.workers):
            row = rows.get(name)
            if row is not None:
                await self._apply_state(name, str(row["state"]),
                                        int(row.get("state_version") or 0),
                                        "changed by command")
            worker = self.workers.get(name)
            if worker is not None:
                worker.resync()  # dead letters replayed by a command are due now

    async def _expire_registrations(self) -> None:
        """LwM2M registrations whose lifetime passed with no update: deregistered. Sleeps
        until the next deadline (looking again at least once a minute, for wall-clock
        steps), or, with no registration, until one arrives."""
        while True:
            self.ingest.lifetimes_changed.clear()
            deadline = self.registry.next_deadline()
            delay = None if deadline is None else min(max(deadline - time.time(), 0.0),
                                                      LIFETIME_RECHECK)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ingest.lifetimes_changed.wait(), delay)
            events, change = self.registry.expire(time.time())
            if events:
                await self.ingest.enqueue_events(events, change)
                log.info("lwm2m registrations expired", devices=[e.device_id for e in events])

    def _record_wear(self) -> None:
        self.metrics.bytes_written.inc(self.wear.sample())
        skew = self.store.clock.wall_skew()
        if abs(skew - self._skew) > CLOCK_STEP:
            log.warning("the wall clock stepped; queue times (due, max_age) do not follow",
                        step_s=round(skew - self._skew, 1))
            self._skew = skew
        if self.wear.due():  # rides with the next commit: no fsync of its own
            record, clock = self.wear.op_record(), self.store.clock

            def notes(conn: Any) -> None:
                record(conn)
                queue_clock.save(conn, clock)  # the floor of queue time after a reboot

            self.store.submit(notes, within=POLL).add_done_callback(_log_failure)

    async def _record_in_flight(self) -> None:
        counts = {name: len(w.in_flight) for name, w in self.workers.items()}
        if counts != self._in_flight_written:
            # For `status` only: it rides with the next commit (within a second) instead
            # of paying for a commit (an fsync and a page written) of its own.
            future = self.store.submit(self.store.op_in_flight(counts), within=POLL)
            future.add_done_callback(_log_failure)
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
        """Reload, logging (not raising) a change that cannot be applied; True when
        applied. (SIGHUP and the file watch use this: nothing may escape.)"""
        try:
            await self.reload(why)
        except (ConfigError, ChangeError):
            return False  # logged and recorded by reload()
        except Exception as exc:  # never a "Task exception was never retrieved"
            log.error("configuration not reloaded; still running the previous one",
                      why=why, problems=[f"{type(exc).__name__}: {exc}"])
            return False
        return True

    async def reload(self, why: str = "changed via API",
                     undo: Callable[[], Awaitable[None]] | None = None) -> None:
        """Re-read the configuration from disk and apply it live, atomically: raise
        ConfigError (a bad file) or ChangeError (it cannot be applied, e.g. a TLS file
        that does not load) and keep the running configuration, untouched. ``undo``
        (the API's) puts the previous file back on failure, before the file watch can
        see it. A failure is logged as one line and recorded for ``status`` and
        ``/readyz`` until a reload succeeds."""
        async with self._reload_lock:
            self._files_seen = self._config_files()
            if self.notifier is not None:
                self.notifier.reloading()
            try:
                new = _embedded_protocol(load_config(self.config.path))
                changed = await self._apply(new)
            except BaseException as error:
                if undo is not None:
                    await undo()
                    self._files_seen = self._config_files()
                if isinstance(error, (ConfigError, ChangeError)):
                    await self._record_failure(why, error.problems)
                raise
            finally:
                if self.notifier is not None:
                    self.notifier.ready("reloaded")
            # The files on disk and the running configuration agree again.
            await self._record_failure(why, None)
        log.info("configuration reloaded", why=why, webhooks=len(self.workers),
                 changed=changed)

    async def refuse_change(self, why: str, problems: list[str]) -> None:
        """A change refused before it was written (the API's validation)."""
        await self._record_failure(why, problems)

    async def _record_failure(self, why: str, problems: list[str] | None) -> None:
        """Note (``problems``) or clear (None) the failed change, here and in the store
        (where ``webhook-bridge status`` reads it)."""
        if problems is None:
            if self.failed_change is None:
                return
            self.failed_change = None
        else:
            log.error("configuration not reloaded; still running the previous one",
                      why=why, problems=problems)
            self.failed_change = {"change": why, "at": int(time.time() * 1000),
                                  "problems": list(problems)}
        with contextlib.suppress(Exception):  # the log line stands if the store is down
            await self.store.write(lambda conn: write_failed_change(conn, self.failed_change))

    async def _apply(self, new: Config) -> bool:
        """Build everything the new configuration needs, then swap it in; a failure while
        building changes nothing. Returns False when there was nothing to change."""
        old = self.config
        for key in ("mqtt", "store", "admin", "log"):
            if getattr(old, key) != getattr(new, key):
                log.warning("this section changes only on restart", section=key)
        new = replace(new, mqtt=old.mqtt, store=old.store, admin=old.admin, log=old.log)
        if new == old:
            return False
        logs.register_secrets(logs.config_secrets(new))
        before = {w.name: w for w in old.webhooks if w.enabled}
        after = {w.name: w for w in new.webhooks if w.enabled}
        changed = [n for n in before if n not in after or before[n] != after[n]]
        built: dict[str, tuple[Sender, Renderer]] = {}
        try:
            decoders = [SourceDecoder(s) for s in new.sources]
            rules = RuleSet(tuple(after.values()))
            for name, webhook in after.items():
                if name not in self.workers or name in changed:
                    try:
                        built[name] = self._build(webhook)
                    except Exception as exc:
                        raise ChangeError([_build_error(webhook, exc)]) from None
        except BaseException as exc:
            for sender, _renderer in built.values():
                await sender.close()
            if isinstance(exc, (ChangeError, ConfigError)) or not isinstance(exc, Exception):
                raise
            raise ChangeError([_describe(exc)]) from None
        # The swap. New rules first: from now on messages are matched against the new
        # webhooks; a replaced or removed webhook's worker still drains what it had in
        # flight.
        self.config, self.decoders = new, decoders
        self.ingest.reconfigure(decoders, rules)
        states = await self.store.read(webhook_rows)
        for name in changed:
            await self._stop_worker(name)
        for name, webhook in after.items():
            if name in built:
                self._start_worker(webhook, states.get(name, {}), built[name])
        gone = {w.name for w in old.webhooks} - {w.name for w in new.webhooks}
        for name in gone:
            count = await self.store.write(self.store.op_dead_all(name, REMOVED_REASON))
            # No status row, no metrics series, no retained notice for a webhook that
            # no longer exists (its dead letters stay until purged).
            await self.store.write(self.store.op_forget_webhook(name))
            self._state_versions.pop(name, None)
            await self.source.publish(status_topic(self.config.mqtt.client_id, name), b"")
            self.metrics.forget(name)
            if count:
                log.warning("queued deliveries of a removed webhook moved to the dead "
                            "letters", webhook=name, count=count)
        await self.source.set_filters(self._filters())
        return True

    # -- the rest -----------------------------------------------------------------------

    async def test_send(self, name: str, event: Event) -> Outcome:
        """Send ``event`` through webhook ``name`` now, outside the queue (the request
        ``webhook-bridge test`` sends)."""
        webhook = self.config.webhook(name)
        if webhook is None:
            raise KeyError(name)
        return await testsend.send(testsend.prepare(webhook, event, self.secrets))

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
    def mqtt_connected(self) -> bool:
        return self.source.connected.is_set()

    @property
    def ready(self) -> bool:
        """Connected to the broker and the store writable (``/readyz``)."""
        return self.source.connected.is_set() and not self.store.failed

    async def _start_embedded_broker(self) -> None:
        cfg = self.config.mqtt
        where = f"{cfg.host}:{cfg.port}"
        try:
            from amqtt.broker import Broker
        except ImportError:
            from .checks import BROKER_EXTRA

            raise StartError(BROKER_EXTRA) from None
        self.broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": where}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        })
        # amqtt logs its own start failure with a traceback before raising: the one line
        # below says it all (SPEC §6).
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.disabled = True
        try:
            await self.broker.start()
        except Exception as exc:
            self.broker = None
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            reason = (os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno
                      else str(cause))
            raise StartError(f"embedded MQTT broker cannot listen on {where}: {reason}; "
                             "change mqtt.port or stop what uses that port (often a "
                             "system mosquitto: systemctl stop mosquitto)") from None
        finally:
            amqtt_log.disabled = False
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


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("status note not recorded", cause=str(future.exception()))


def _describe(exc: BaseException) -> str:
    """One line for an exception met while building a change (file errors name the
    file; ssl errors carry their library reason)."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ssl.SSLError) else f"{type(exc).__name__}: {text}"


def _build_error(webhook: WebhookConfig, exc: BaseException) -> str:
    """Why a webhook's sender could not be built, naming its TLS files when they are
    the cause (an ssl error does not say which file it read)."""
    tls = webhook.tls
    if isinstance(exc, ssl.SSLError) and tls is not None:
        files = ", ".join(f"tls.{key} {value}" for key, value in (
            ("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
            ("key_file", tls.key_file)) if value)
        return (f"webhook {webhook.name}: its TLS files do not load ({files}): "
                f"{_describe(exc)}; fix the file or the path")
    return f"webhook {webhook.name}: {_describe(exc)}"


def _log_allocations() -> None:
    top = tracemalloc.take_snapshot().statistics("lineno")[:15]
    log.warning("memory", top=[str(stat) for stat in top])


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
