"""systemd integration: the ``sd_notify`` protocol, written by hand (no dependency).

Owns the datagrams the daemon sends to systemd when it runs as a ``Type=notify`` service:
``READY=1`` once started, ``RELOADING=1`` around a config reload, ``STOPPING=1`` when
draining, ``STATUS=`` lines for ``systemctl status``, and the ``WATCHDOG=1`` keep-alive.
Everything is a no-op when ``NOTIFY_SOCKET`` is unset (run from a terminal, in Docker),
and nothing here ever raises: a lost notification must not take the bridge down.

Protocol: newline-separated ``KEY=VALUE`` assignments in one datagram to the AF_UNIX
socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
The watchdog must be pinged more often than ``WATCHDOG_USEC``; we ping at half of it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import structlog

log = structlog.get_logger("bridge.systemd")
T = TypeVar("T")

STATUS_PERIOD = 10.0  # seconds between STATUS= updates when there is no watchdog


class Notifier:
    """Sends notifications to the service manager named by the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = _int(env.get("WATCHDOG_PID"))
        self._sock: socket.socket | None = None
        self._failed = False  # a send failed already (logged once)
        self.last_status: str | None = None  # the last STATUS= sent, from any caller

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not sent."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # never stall the event loop on a full queue
                self._sock = sock
            self._sock.sendto(message, self.address)
            for line in assignments:
                if line.startswith("STATUS="):
                    self.last_status = line[len("STATUS="):]
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("cannot notify systemd", socket=_printable(self.address),
                          cause=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished."""
        return self.notify("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status_line(text))

    def reloading(self, status: str | None = "reloading configuration") -> bool:
        """A reload began; send :meth:`ready` when it is done. ``MONOTONIC_USEC`` is what
        systemd >= 253 requires with ``Type=notify-reload``; older versions ignore it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_line(status))

    def stopping(self, status: str | None = "draining in-flight work") -> bool:
        return self.notify("STOPPING=1", *_status_line(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``); None without a watchdog or
        when ``WATCHDOG_PID`` names another process (the variable was inherited)."""
        if self.address is None or not self._watchdog_usec or self._watchdog_usec <= 0:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(notifier: Notifier, alive: Callable[[], bool],
                       status: Callable[[], str]) -> None:
    """Ping the watchdog while ``alive()`` holds, and keep ``STATUS=`` current.

    Runs until cancelled. When ``alive()`` turns false the pings stop, so systemd kills
    and restarts the service after ``WatchdogSec``; the loop itself running proves only
    that the event loop is not stuck, ``alive()`` says whether the bridge still works.
    """
    if not notifier.enabled:
        return
    interval = notifier.watchdog_interval()
    healthy = True
    while True:
        ok = bool(_call(alive, False))
        lines: list[str] = []
        if interval is not None and ok:
            lines.append("WATCHDOG=1")
        if ok != healthy:
            healthy = ok
            if ok:
                log.info("bridge healthy again; watchdog pings resumed")
            else:
                log.error("bridge unhealthy; watchdog pings stopped (systemd restarts it)")
        text = _call(status, None)
        if text:
            text = " ".join(text.splitlines())
            if text != notifier.last_status:  # also replaces "reloaded" and the like
                lines.extend(_status_line(text))
        notifier.notify(*lines)
        await asyncio.sleep(interval if interval is not None else STATUS_PERIOD)


def _call(func: Callable[[], T], default: T) -> T:
    try:
        return func()
    except Exception as exc:  # a broken probe must not stop the loop
        log.debug("watchdog probe failed", cause=str(exc))
        return default


def _status_line(text: str | None) -> list[str]:
    if not text:
        return []
    return ["STATUS=" + " ".join(text.splitlines())]  # a newline would end the assignment


def _address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if not value.startswith("/"):
        return None  # only absolute paths and abstract names are valid (vsock is not used)
    return value


def _printable(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
