"""systemd integration: the sd_notify datagrams (against a socket the test owns), the
daemon as a ``Type=notify`` service with a watchdog, and the shipped unit file
(``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.systemd import Notifier, run_watchdog

from .support import ROOT, Daemon, Mosquitto, wait_for

UNIT = ROOT / "systemd" / "webhook-bridge.service"


class Receiver:
    """The service manager's side: a datagram socket collecting notifications."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.datagrams: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.datagrams.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.datagrams

    def lines(self) -> list[str]:
        return [line for d in self.poll() for line in d.split("\n")]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    receiver = Receiver(path)
    yield receiver
    receiver.close()


# -- the protocol ------------------------------------------------------------------------

def test_notifier_sends_the_protocol_datagrams(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    assert notifier.enabled and notifier.watchdog_interval() == 0.2
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready("started; 2 webhooks")
    assert notifier.status("line one\nline two")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.close()
    got = receiver.poll()
    assert got[:3] == ["READY=1\nSTATUS=started; 2 webhooks", "STATUS=line one line two",
                       "WATCHDOG=1"]
    reloading = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading "
                             r"configuration", got[3])
    assert reloading is not None, got[3]
    assert before <= int(reloading.group(1)) <= after
    assert got[4:] == ["STOPPING=1\nSTATUS=draining in-flight work"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@webhook-bridge-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = Receiver(name)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    try:
        assert Notifier().ready()
        assert receiver.poll() == ["READY=1"]
    finally:
        receiver.close()


def test_everything_is_a_no_op_without_systemd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    notifier = Notifier()
    assert not notifier.enabled
    assert [notifier.ready("x"), notifier.status("x"), notifier.watchdog(),
            notifier.reloading(), notifier.stopping()] == [False] * 5
    assert notifier.watchdog_interval() is None
    # An inherited watchdog (another PID) is not ours to ping.
    env = {"NOTIFY_SOCKET": str(tmp_path / "x.sock"), "WATCHDOG_USEC": "400000",
           "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env).watchdog_interval() is None
    # Nobody listening: the send fails quietly, every time.
    dead = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert dead.enabled and dead.ready() is False and dead.watchdog() is False
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False


async def test_watchdog_pings_only_while_alive(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    healthy = True
    text = "mqtt connected; 0 queued"
    notifier = Notifier()
    task = asyncio.create_task(run_watchdog(notifier, lambda: healthy, lambda: text))
    try:
        await wait_for(lambda: receiver.count("WATCHDOG=1") >= 3, 5, "three pings")
        assert receiver.poll()[0] == "WATCHDOG=1\nSTATUS=mqtt connected; 0 queued"
        text = "mqtt connected; 5 queued"
        await wait_for(lambda: "STATUS=mqtt connected; 5 queued" in receiver.lines(), 5,
                       "the new status")
        healthy, text = False, "mqtt disconnected"
        await wait_for(lambda: "STATUS=mqtt disconnected" in receiver.lines(), 5,
                       "a status while unhealthy")
        pings = receiver.count("WATCHDOG=1")
        text = "still unhealthy"
        await wait_for(lambda: "STATUS=still unhealthy" in receiver.lines(), 5,
                       "another status while unhealthy")
        assert receiver.count("WATCHDOG=1") == pings  # no ping while unhealthy
        healthy = True
        await wait_for(lambda: receiver.count("WATCHDOG=1") > pings, 5, "pings to resume")
        statuses = [line for line in receiver.lines() if line.startswith("STATUS=")]
        assert statuses == ["STATUS=mqtt connected; 0 queued", "STATUS=mqtt connected; 5 queued",
                            "STATUS=mqtt disconnected", "STATUS=still unhealthy"]
        # A status someone else sent (a reload's "reloaded") gives way to the live one.
        notifier.ready("reloaded")
        await wait_for(lambda: receiver.lines()[-1] == "STATUS=still unhealthy", 5,
                       "the live status to come back")
        statuses = [line for line in receiver.lines() if line.startswith("STATUS=")]
        assert statuses[-2:] == ["STATUS=reloaded", "STATUS=still unhealthy"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_returns_at_once_without_systemd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    await asyncio.wait_for(run_watchdog(Notifier(), lambda: True, lambda: "x"), 1)


# -- the daemon as a Type=notify service ---------------------------------------------------

async def test_daemon_notifies_ready_watchdog_and_stopping(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    path = str(tmp_path / "notify.sock")
    receiver = Receiver(path)
    config = {
        "mqtt": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": f"wb-{tmp_path.name}"},
        "store": {"path": str(tmp_path / "state" / "queue.db")},
        "admin": {"listen": None},
        "log": {"format": "json", "level": "info"},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry"}],
        "webhooks": [],
    }
    daemon = Daemon(tmp_path, config, env={"NOTIFY_SOCKET": path,
                                           "WATCHDOG_USEC": "400000"}).start()
    try:
        await wait_for(lambda: "READY=1" in receiver.lines() or daemon.proc.poll() is not None,
                       20, "READY=1")
        assert daemon.proc.poll() is None, daemon.output()
        # Pings every 200 ms: two of them within a few seconds, even on a slow machine.
        await wait_for(lambda: receiver.count("WATCHDOG=1") >= 2, 10, "two watchdog pings")
        assert receiver.lines().index("READY=1") < receiver.lines().index("WATCHDOG=1")
        assert daemon.terminate() == 0, daemon.output()
        lines = receiver.lines()
        assert "STOPPING=1" in lines and lines.index("READY=1") < lines.index("STOPPING=1")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        receiver.close()


# -- the unit file --------------------------------------------------------------------------

def unit_lines() -> list[str]:
    return [line for line in UNIT.read_text().splitlines()
            if line and not line.startswith("#")]


def test_unit_file_says_what_operators_rely_on() -> None:
    lines = unit_lines()
    for wanted in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30",
                   "ExecStart=/usr/bin/webhook-bridge run", "ExecReload=/bin/kill -HUP $MAINPID",
                   "Restart=on-failure", "RestartPreventExitStatus=78", "TimeoutStopSec=60",
                   "User=webhook-bridge", "StateDirectory=webhook-bridge",
                   "ConfigurationDirectory=webhook-bridge",
                   "Environment=WEBHOOK_BRIDGE_CONFIG=/etc/webhook-bridge/config.yaml",
                   "ReadWritePaths=/etc/webhook-bridge/conf.d", "ProtectSystem=strict",
                   "NoNewPrivileges=yes", "CapabilityBoundingSet=", "UMask=0077"):
        assert wanted in lines, wanted


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart on an executable that exists here."""
    text = UNIT.read_text().replace("ExecStart=/usr/bin/webhook-bridge run",
                                    f"ExecStart={sys.executable} -m bridge run")
    assert text != UNIT.read_text()
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return binary


def test_unit_file_verifies(tmp_path: Path) -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(verifiable_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values too: it only warns, so demand silence.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unit_file_sandbox_is_tight(tmp_path: Path) -> None:
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--threshold=20",
                             str(verifiable_unit(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr  # exposure <= 2.0 ("OK")
