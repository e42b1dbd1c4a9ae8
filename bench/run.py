"""The webhook-bridge benchmark (issue 7): one command, one JSON line per scenario.

    python bench/run.py [--scenario steady|paced|backlog|batch|idle|all|instrument] [--quick]
                        [--publisher raw|paho]

For every scenario it starts, on loopback only and in a fresh temp dir: a private
Mosquitto on a free port, the HTTP sink (``bench/sink.py``, a separate process), and the
bridge itself (``python -m bridge run -c <generated config>``) with a fresh store. It waits
until the bridge delivers a probe, publishes the load (QoS 1, ~200-byte JSON payloads over
``bench/dev-{k}/data`` for 10 devices; raw MQTT packets by default, or paho-mqtt), waits
for the deliveries, reads the bridge's CPU, memory and block writes from ``/proc/<pid>``,
and prints one JSON line to stdout (progress goes to stderr). ``instrument`` measures the
instrument's own ceiling (publishers without a bridge, sink under a pipelined HTTP load)
and is not part of ``all``.
Everything is torn down at the end, also on Ctrl-C. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml

ROOT = Path(__file__).resolve().parent.parent
SINK_SCRIPT = Path(__file__).resolve().parent / "sink.py"
SCENARIOS = ("steady", "paced", "backlog", "batch", "idle", "lowrate")
DEVICES = 10
PAYLOAD_BYTES = 200
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEADLINES = {"steady": 300.0, "paced": 240.0, "lowrate": 400.0, "backlog": 600.0,
             "batch": 300.0,
             "idle": 90.0, "instrument": 120.0}
# store.* keys added to the bridge's config (--durability, --commit-window)
STORE_EXTRA: dict[str, Any] = {}
BACKLOG_INGEST_SHARE = 0.7  # of the backlog deadline, at most, for queueing the backlog


@dataclass(frozen=True)
class Sizes:
    """How much load each scenario gets (``--quick`` divides by 10)."""

    steady: int = 20_000
    paced_rate: float = 500.0
    paced_s: float = 30.0
    backlog: int = 200_000
    batch: int = 20_000
    idle_s: float = 10.0
    lowrate_rates: tuple[float, ...] = (30.0, 500.0)
    lowrate_s: float = 40.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(steady=2_000, paced_s=5.0, backlog=20_000, batch=2_000, idle_s=5.0,
                   lowrate_s=10.0)


class Deadline:
    """A scenario's hard time limit."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.end


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc readings ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` value (VmRSS, VmHWM) from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def written_bytes(pid: int) -> tuple[int, str]:
    """Block-layer writes of the process (``write_bytes``), or ``wchar`` as a fallback."""
    try:
        values = dict(line.split(": ") for line in
                      Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return 0, "unavailable"
    if "write_bytes" in values:
        return int(values["write_bytes"]), "write_bytes"
    return int(values.get("wchar", 0)), "wchar"


@dataclass
class Snapshot:
    """The bridge's counters at one moment, plus the CPU of the instrument's processes."""

    at: float
    cpu_s: float
    written: int
    io_source: str
    instrument_cpu_s: dict[str, float]

    @classmethod
    def take(cls, pid: int, instrument: dict[str, int] | None = None) -> Snapshot:
        written, source = written_bytes(pid)
        own = os.times()
        others = {"runner": own.user + own.system}
        for name, other in (instrument or {}).items():
            with contextlib.suppress(OSError):
                others[name] = cpu_seconds(other)
        return cls(time.time(), cpu_seconds(pid), written, source, others)


def schedstat_seconds(pid: int) -> float | None:
    """CPU time of the live threads of ``pid`` in nanosecond resolution (schedstat)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


class RssSampler:
    """Samples VmRSS of a process in a thread; ``max_mb`` since the last ``reset``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.max_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.max_kb = max(self.max_kb, status_kb(self.pid, "VmRSS"))

    @property
    def max_mb(self) -> float:
        return round(self.max_kb / 1024, 1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def git_state() -> dict[str, Any]:
    """The commit measured, and whether bridge/ differs from it (read-only git calls)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "bridge_dirty": bool(git("status", "--porcelain", "--", "bridge"))}


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")), 0)
    return {"nproc": os.cpu_count(), "cpu_model": models[0] if models else platform.machine(),
            "ram_gb": round(mem_kb / 1024 / 1024, 1), "python": platform.python_version(),
            "kernel": platform.release(),
            "sink_loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"}


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the runner dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """Start a child in its own session (Ctrl-C reaches only the runner, which tears down)."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Mosquitto:
    """A private Mosquitto: no persistence, large queues, $SYS every second."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 10000000\n"
                        "max_inflight_messages 1000\nsys_interval 1\n"
                        "set_tcp_nodelay true\n"
                        # keep root's uid when run as root: a uid change would clear the
                        # parent-death signal that stops the broker if the runner is killed
                        + ("user root\n" if os.geteuid() == 0 else ""))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = spawn([binary, "-c", str(conf)], self.workdir / "mosquitto.log",
                          self.workdir)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


class SinkProcess:
    """``bench/sink.py`` in its own process, driven through its control endpoints."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SinkProcess:
        self.proc = spawn([sys.executable, str(SINK_SCRIPT), "--port", str(self.port)],
                          self.workdir / "sink.log", self.workdir)
        wait_port(self.port)
        return self

    def _call(self, method: str, action: str, timeout: float = 30.0) -> Any:
        request = urllib.request.Request(f"{self.url}/_ctl/{action}", method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def mode(self, status: int) -> None:
        self._call("POST", f"mode?status={status}")

    def reset(self) -> None:
        self._call("POST", "reset")

    def progress(self) -> dict[str, Any]:
        return dict(self._call("GET", "progress"))

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "stats", timeout=60.0))

    def stop(self) -> None:
        stop_process(self.proc)


def bridge_config(workdir: Path, broker_port: int, sink_url: str, batch: bool
                  ) -> dict[str, Any]:
    webhook: dict[str, Any] = {
        "name": "sink", "url": f"{sink_url}/ingest/{{device_id}}",
        "allow_insecure_http": True, "concurrency": 8,
        "retry": {"initial": "100ms", "max": "2s"},
        "failure_limit": 0,  # the backlog's 503 phase must not disable the webhook
    }
    if batch:
        webhook["batch"] = {"max_events": 100, "max_wait": "200ms"}
    return {
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": "bench-bridge"},
        "store": {"path": str(workdir / "state" / "queue.db"), "max_size": "2GB",
                  **STORE_EXTRA},
        "admin": {"listen": None},
        "log": {"format": "json", "level": "warning"},
        "sources": [{"name": "bench", "topic": "bench/{device_id}/data", "qos": 1,
                     "format": "json"}],
        "webhooks": [webhook],
    }


class BridgeProcess:
    """The bridge under test: ``python -m bridge run -c <config>``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "bridge.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "bridge.log"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> tuple[int, str]:
        """``bridge check``: its exit code and output."""
        done = subprocess.run([sys.executable, "-m", "bridge", "check", "-c",
                               str(self.config_path)], capture_output=True, text=True,
                              env=self.env, cwd=self.workdir, timeout=60)
        return done.returncode, (done.stdout + done.stderr).strip()

    def start(self) -> BridgeProcess:
        self.proc = spawn([sys.executable, "-m", "bridge", "run", "-c", str(self.config_path)],
                          self.log_path, self.workdir, self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        stop_process(self.proc)


# -- the load generator -----------------------------------------------------------------


def payload(seq: int, device: str) -> bytes:
    """~200 bytes of JSON: seq, ts (``time.time()`` now), device, padding."""
    head = f'{{"seq": {seq}, "ts": {time.time()!r}, "device": "{device}", "pad": "'
    return (head + "x" * max(0, PAYLOAD_BYTES - len(head) - 2) + '"}').encode()


def device_topics() -> list[tuple[str, str]]:
    return [(f"dev-{k}", f"bench/dev-{k}/data") for k in range(DEVICES)]


class RawPublisher:
    """The default load generator: MQTT 3.1.1 QoS 1 PUBLISH packets written straight to a
    socket, many per ``send`` call, with PUBACKs counted in bulk. It keeps at most
    ``WINDOW`` messages unacknowledged, like a client with 1000 in flight. It costs a few
    microseconds per message, so on a 2-core machine it leaves the CPU to the bridge."""

    CHUNK = 64  # messages per socket write in a burst

    def __init__(self, port: int, client_id: str = "bench-publisher") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.topics = [(d, _mqtt_string(t)) for d, t in device_topics()]
        self.sent = self.acked = 0
        self._buffer: list[bytes] = []
        self._carry = b""
        self._connect(client_id)

    def _connect(self, client_id: str) -> None:
        # protocol "MQTT" level 4, clean session, keepalive 0 (never times out)
        body = _mqtt_string("MQTT") + bytes([4, 0x02, 0, 0]) + _mqtt_string(client_id)
        self.sock.sendall(bytes([0x10]) + _varint(len(body)) + body)
        connack = _recv_exactly(self.sock, 4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"MQTT CONNECT refused: {connack.hex()}")

    def send(self, seq: int) -> None:
        device, topic = self.topics[seq % DEVICES]
        body = payload(seq, device)
        packet_id = seq % 65535 + 1
        header = topic + packet_id.to_bytes(2, "big")
        self._buffer.append(bytes([0x32]) + _varint(len(header) + len(body)) + header + body)
        self.sent += 1
        if len(self._buffer) >= self.CHUNK:
            self.flush()

    def probe(self) -> None:
        body = json.dumps({"seq": -1, "ts": time.time()}).encode()
        header = self.topics[0][1] + (65535).to_bytes(2, "big")
        self.sock.sendall(bytes([0x32]) + _varint(len(header) + len(body)) + header + body)
        self.sent += 1

    def flush(self) -> None:
        if self._buffer:
            self.sock.sendall(b"".join(self._buffer))
            self._buffer.clear()

    def service(self, timeout: float) -> None:
        """Count the PUBACKs that arrived, waiting up to ``timeout`` for the first."""
        self.flush()
        try:
            if timeout <= 0:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            else:
                self.sock.settimeout(timeout)
                data = self.sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        if not data:
            raise RuntimeError("the broker closed the publisher's connection")
        data = self._carry + data
        whole = len(data) - len(data) % 4
        if any(b != 0x40 for b in data[0:whole:4]):
            raise RuntimeError("unexpected packet from the broker (expected PUBACKs)")
        self.acked += whole // 4
        self._carry = data[whole:]

    def outstanding(self) -> int:
        return self.sent - self.acked

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
        self.sock.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise RuntimeError("the broker closed the connection")
        data += chunk
    return data


class PahoPublisher:
    """The paho-mqtt load generator (``--publisher paho``): MQTT 3.1.1, QoS 1, 1000 in
    flight, driven by ``loop()`` in this thread (no network thread: twice as fast)."""

    def __init__(self, port: int, client_id: str = "bench-publisher") -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=600)
        self.topics = device_topics()
        self.sent = self.acked = 0
        while not self.client.is_connected():
            self.client.loop(0.1)

    def _on_publish(self, *args: Any) -> None:
        self.acked += 1

    def send(self, seq: int) -> None:
        device, topic = self.topics[seq % DEVICES]
        self.client.publish(topic, payload(seq, device), qos=1)
        self.sent += 1

    def probe(self) -> None:
        self.client.publish(self.topics[0][1], json.dumps({"seq": -1, "ts": time.time()}), 1)
        self.sent += 1

    def flush(self) -> None:
        self.client.loop_write()

    def service(self, timeout: float) -> None:
        self.client.loop(max(timeout, 0.0))

    def outstanding(self) -> int:
        return self.sent - self.acked

    def close(self) -> None:
        self.client.disconnect()


Publisher = RawPublisher | PahoPublisher
PUBLISHERS: dict[str, Callable[[int], Publisher]] = {"raw": RawPublisher,
                                                     "paho": PahoPublisher}
WINDOW = 1000  # unacknowledged messages at most


def wait_acked(publisher: Publisher, deadline: Deadline) -> bool:
    while publisher.outstanding() > 0:
        if deadline.passed():
            return False
        publisher.service(min(0.05, deadline.left()))
    return True


def burst(publisher: Publisher, count: int, deadline: Deadline) -> float:
    """Publish ``count`` messages as fast as possible and wait for every PUBACK; return
    the seconds to the last PUBACK."""
    start = time.monotonic()
    for seq in range(count):
        publisher.send(seq)
        if seq % 64 == 63:
            publisher.service(0)
            while publisher.outstanding() >= WINDOW and not deadline.passed():
                publisher.service(0.05)
    publisher.flush()
    wait_acked(publisher, deadline)
    return time.monotonic() - start


def paced(publisher: Publisher, rate: float, seconds: float, deadline: Deadline) -> int:
    """Publish ``rate`` messages per second for ``seconds``; return how many were sent."""
    count = int(rate * seconds)
    start = time.monotonic()
    sent = 0
    for seq in range(count):
        while (delay := start + seq / rate - time.monotonic()) > 0:
            publisher.service(delay)
        if deadline.passed():
            break
        publisher.send(seq)
        publisher.flush()
        sent += 1
    wait_acked(publisher, deadline)
    return sent


class BrokerStore:
    """Watches Mosquitto's ``$SYS/broker/store/messages/count``: the messages the broker
    still holds, i.e. not yet acknowledged by the bridge."""

    TOPIC = "$SYS/broker/store/messages/count"

    def __init__(self, port: int) -> None:
        self.count: int | None = None
        self.updated = 0.0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-sys")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(self.TOPIC)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            self.count = int(message.payload)
            self.updated = time.monotonic()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- one rig per scenario ---------------------------------------------------------------


class NotSupported(Exception):
    """The bridge refuses the scenario's configuration (e.g. no batch support yet)."""


class Rig:
    """Broker, sink and bridge in a fresh temp dir; torn down on exit whatever happens."""

    def __init__(self, scenario: str, publisher: str = "raw", batch: bool = False,
                 with_bridge: bool = True) -> None:
        self.scenario = scenario
        self.publisher_kind = publisher
        self.batch = batch
        self.with_bridge = with_bridge
        self.workdir = Path(tempfile.mkdtemp(prefix=f"wb-bench-{scenario}-"))
        self.broker = Mosquitto(self.workdir)
        self.sink = SinkProcess(self.workdir)
        self.bridge: BridgeProcess | None = None
        self.publisher: Publisher | None = None

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.broker.start()
        self.sink.start()
        if self.with_bridge:
            config = bridge_config(self.workdir, self.broker.port, self.sink.url, self.batch)
            self.bridge = BridgeProcess(self.workdir, config)
            code, output = self.bridge.check()
            if code == 78 and self.batch:
                raise NotSupported(f"bridge check exited {code}: {output[-400:]}")
            if code != 0:
                raise RuntimeError(f"bridge check exited {code}: {output[-400:]}")
            self.bridge.start()
        self.publisher = PUBLISHERS[self.publisher_kind](self.broker.port)

    def snapshot(self) -> Snapshot:
        assert self.bridge is not None
        pids = {name: proc.pid for name, proc in
                (("sink", self.sink.proc), ("broker", self.broker.proc)) if proc is not None}
        return Snapshot.take(self.bridge.pid, pids)

    def wait_ready(self, seconds: float = 60.0) -> float:
        """Probe until the sink sees one delivery, then reset the sink; return seconds."""
        assert self.publisher is not None and self.bridge is not None
        start = time.monotonic()
        while self.sink.progress()["probes"] == 0:
            if self.bridge.exited() is not None:
                raise RuntimeError(f"bridge exited {self.bridge.exited()}: "
                                   f"{tail(self.bridge.log_path)}")
            if time.monotonic() - start > seconds:
                raise RuntimeError(f"bridge not delivering after {seconds}s: "
                                   f"{tail(self.bridge.log_path)}")
            self.publisher.probe()
            self.publisher.service(0.25)
        time.sleep(0.5)  # let any later probe through before the reset
        self.sink.reset()
        return time.monotonic() - start

    def close(self) -> None:
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                self.publisher.close()
        if self.bridge is not None:
            self.bridge.stop()
        self.sink.stop()
        self.broker.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- measuring ---------------------------------------------------------------------------


def wait_delivered(rig: Rig, count: int, deadline: Deadline, interval: float = 0.2) -> bool:
    """Poll the sink until ``count`` distinct seqs arrived; False on the deadline or when
    the bridge exits."""
    assert rig.bridge is not None
    while rig.sink.progress()["distinct"] < count:
        if deadline.passed() or rig.bridge.exited() is not None:
            return False
        time.sleep(interval)
    time.sleep(0.3)  # late duplicates, if any, get counted
    return True


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (sorted ascending)."""
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return values[index]


def delivery_summary(stats: dict[str, Any], published: int) -> dict[str, Any]:
    """lost, duplicated and latency percentiles (first delivery of each seq)."""
    first: dict[int, float] = {}
    for seq, latency in zip(stats["seqs"], stats["latencies_s"]):
        first.setdefault(seq, latency)
    in_range = [s for s in first if 0 <= s < published]
    latencies = sorted(first[s] * 1000 for s in in_range)
    return {
        "delivered": len(in_range),
        "lost": published - len(in_range),
        "duplicated": len(stats["seqs"]) - len(first),
        "requests": stats["requests"],
        "latency_ms": {f"p{q}": _round(percentile(latencies, q), 1) for q in (50, 95, 99)},
        "latency_ms_max": _round(latencies[-1] if latencies else None, 1),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def process_summary(pid: int, before: Snapshot, after: Snapshot, delivered: int,
                    messages: int) -> dict[str, Any]:
    cpu = after.cpu_s - before.cpu_s
    written = after.written - before.written
    return {
        "bridge_cpu_s": round(cpu, 2),
        "bridge_cpu_s_per_1000": round(cpu / delivered * 1000, 3) if delivered else None,
        "bridge_cpu_percent": round(cpu / max(after.at - before.at, 1e-9) * 100, 1),
        "peak_rss_mb": round(status_kb(pid, "VmHWM") / 1024, 1),
        "sqlite_bytes_written_per_msg": round(written / messages) if messages else None,
        "bytes_written_source": f"{after.io_source} (all block writes of the bridge process)"
                                if after.io_source == "write_bytes" else after.io_source,
    }


def load_result(name: str, rig: Rig, published: int, before: Snapshot, after: Snapshot,
                completed: bool, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON line of a scenario that published ``published`` messages."""
    assert rig.bridge is not None
    stats = stats or rig.sink.stats()
    summary = delivery_summary(stats, published)
    last = stats["last_new_at"] or after.at
    span = last - before.at
    result: dict[str, Any] = {
        "scenario": name, "messages": published,
        "delivered_msg_per_s": round(summary["delivered"] / span, 1)
        if summary["delivered"] and span > 0 else 0.0,
        **summary,
        **process_summary(rig.bridge.pid, before, after, summary["delivered"], published),
        "duration_s": round(span, 2),
        "timeout": not completed,
        "instrument_cpu_percent": instrument_cpu(before, after),
    }
    return _with_exit(result, rig)


def instrument_cpu(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU % of one core used by the runner (publisher), the sink and the broker."""
    span = max(after.at - before.at, 1e-9)
    return {name: round((after.instrument_cpu_s[name] - value) / span * 100, 1)
            for name, value in before.instrument_cpu_s.items()
            if name in after.instrument_cpu_s}


def _with_exit(result: dict[str, Any], rig: Rig) -> dict[str, Any]:
    """Add why a scenario went wrong: the bridge's exit code, log tail and stacks."""
    assert rig.bridge is not None
    code = rig.bridge.exited()
    if code is not None:
        result["bridge_exit"] = code
    if code is not None or result.get("timeout"):
        result["bridge_log_tail"] = tail(rig.bridge.log_path)
    if code is None and result.get("timeout"):
        result["bridge_stack"] = py_spy_dump(rig.bridge.pid)
    return result


def py_spy_dump(pid: int) -> str | None:
    """The bridge's Python stacks (``py-spy dump``) when py-spy is installed."""
    binary = shutil.which("py-spy")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"py-spy failed: {exc}"
    return (done.stdout or done.stderr)[-4000:]


# -- scenarios ---------------------------------------------------------------------------


def burst_scenario(name: str, count: int, kind: str, deadline: Deadline) -> dict[str, Any]:
    """steady / batch: ``count`` messages as fast as possible."""
    with Rig(name, kind, batch=name == "batch") as rig:
        rig.wait_ready(min(60.0, deadline.left()))
        assert rig.publisher is not None and rig.bridge is not None
        before = rig.snapshot()
        publish_s = burst(rig.publisher, count, deadline)
        log(f"{name}: published {count} in {publish_s:.2f}s; waiting for deliveries")
        completed = wait_delivered(rig, count, deadline)
        after = rig.snapshot()
        result = load_result(name, rig, count, before, after, completed)
        result["publish_s"] = round(publish_s, 2)
        return result


def paced_scenario(sizes: Sizes, kind: str, deadline: Deadline) -> dict[str, Any]:
    """paced: a fixed rate for a fixed time; latency is the point."""
    with Rig("paced", kind) as rig:
        rig.wait_ready(min(60.0, deadline.left()))
        assert rig.publisher is not None and rig.bridge is not None
        before = rig.snapshot()
        published = paced(rig.publisher, sizes.paced_rate, sizes.paced_s, deadline)
        log(f"paced: published {published} at {sizes.paced_rate:g}/s; waiting for deliveries")
        completed = wait_delivered(rig, published, deadline)
        after = rig.snapshot()
        result = load_result("paced", rig, published, before, after, completed)
        result["rate_msg_per_s"] = sizes.paced_rate
        return result


def lowrate_scenario(sizes: Sizes, kind: str, deadline: Deadline) -> dict[str, Any]:
    """lowrate: what each delivered message costs in disk writes and CPU when messages
    trickle in (30 sensors at 1 Hz) and at a moderate rate, one fresh bridge per rate.
    Flash wear is the point: ``sqlite_bytes_written_per_msg`` counts every block write of
    the bridge process (/proc/PID/io write_bytes: WAL frames, checkpoints, logs)."""
    runs = []
    for rate in sizes.lowrate_rates:
        with Rig("lowrate", kind) as rig:
            rig.wait_ready(min(60.0, deadline.left()))
            assert rig.publisher is not None and rig.bridge is not None
            before = rig.snapshot()
            published = paced(rig.publisher, rate, sizes.lowrate_s, deadline)
            log(f"lowrate: published {published} at {rate:g}/s; waiting for deliveries")
            completed = wait_delivered(rig, published, deadline)
            after = rig.snapshot()
            result = load_result("lowrate", rig, published, before, after, completed)
            result["rate_msg_per_s"] = rate
            result["bridge_cpu_ms_per_msg"] = round(
                (after.cpu_s - before.cpu_s) / max(published, 1) * 1000, 3)
            runs.append(result)
    keys = ("rate_msg_per_s", "messages", "delivered", "sqlite_bytes_written_per_msg",
            "bridge_cpu_ms_per_msg", "latency_ms", "timeout")
    return {"scenario": "lowrate", "runs": [{k: r.get(k) for k in keys if k in r}
                                            for r in runs],
            "detail": runs}


def wait_ingested(rig: Rig, store: BrokerStore, baseline: int, deadline: Deadline) -> bool:
    """Wait until the broker holds no more than ``baseline`` messages (the bridge has
    committed and acknowledged the whole backlog)."""
    assert rig.bridge is not None
    fresh_after = time.monotonic()
    while True:
        if store.updated > fresh_after and store.count is not None and store.count <= baseline:
            return True
        if deadline.passed() or rig.bridge.exited() is not None:
            return False
        time.sleep(0.2)


@dataclass
class Backlog:
    """What happened while the sink was down."""

    before: Snapshot
    publish_s: float
    ingested: bool
    queued_at: float
    rss_mb_max: float


def queue_backlog(rig: Rig, count: int, deadline: Deadline) -> Backlog:
    """Sink down, publish ``count`` messages, wait until the bridge has acknowledged them
    all to the broker (so they wait in its store), sampling its RSS meanwhile."""
    assert rig.bridge is not None and rig.publisher is not None
    store = BrokerStore(rig.broker.port)
    try:
        time.sleep(2.5)  # two $SYS updates: the baseline
        baseline = store.count or 0
        rig.sink.mode(503)
        with RssSampler(rig.bridge.pid) as sampler:
            before = rig.snapshot()
            publish_s = burst(rig.publisher, count, deadline)
            log(f"backlog: published {count} in {publish_s:.2f}s; waiting for the bridge "
                "to queue them")
            ingested = wait_ingested(rig, store, baseline, deadline)
            queued_at = time.time()
        return Backlog(before, publish_s, ingested, queued_at, sampler.max_mb)
    finally:
        store.close()


def backlog_scenario(count: int, kind: str, deadline: Deadline) -> dict[str, Any]:
    """backlog: the sink is down while ``count`` messages queue, then comes back."""
    with Rig("backlog", kind) as rig:
        rig.wait_ready(min(60.0, deadline.left()))
        backlog = queue_backlog(rig, count, Deadline(deadline.left() * BACKLOG_INGEST_SHARE))
        rig.sink.mode(200)
        log(f"backlog: queued={backlog.ingested} after "
            f"{backlog.queued_at - backlog.before.at:.1f}s, rss max {backlog.rss_mb_max} MB; "
            "sink up, draining")
        completed = wait_delivered(rig, count, deadline)
        after = rig.snapshot()
        stats = rig.sink.stats()
        result = load_result("backlog", rig, count, backlog.before, after,
                             completed and backlog.ingested, stats)
        result.update(drain_summary(backlog, stats, result["delivered"], count))
        return result


def drain_summary(backlog: Backlog, stats: dict[str, Any], delivered: int, count: int
                  ) -> dict[str, Any]:
    ingest_s = backlog.queued_at - backlog.before.at
    last = stats["last_new_at"] or backlog.queued_at
    first_ok = stats["first_ok_at"] or last
    drain_s = last - first_ok
    return {
        "publish_s": round(backlog.publish_s, 2),
        "ingest_complete": backlog.ingested, "ingest_s": round(ingest_s, 2),
        "ingest_msg_per_s": round(count / ingest_s, 1) if ingest_s > 0 else None,
        "backlog_rss_mb_max": backlog.rss_mb_max,
        "first_200_after_s": round(first_ok - backlog.queued_at, 2),
        "drain_s": round(drain_s, 2),
        "drain_msg_per_s": round(delivered / drain_s, 1) if drain_s > 0 else None,
    }


def idle_scenario(seconds: float, kind: str, deadline: Deadline) -> dict[str, Any]:
    """idle: the bridge connected, with nothing to do."""
    with Rig("idle", kind) as rig:
        rig.wait_ready(min(60.0, deadline.left()))
        assert rig.bridge is not None
        pid = rig.bridge.pid
        time.sleep(2.0)  # settle after the probe
        before, precise_before = rig.snapshot(), schedstat_seconds(pid)
        time.sleep(min(seconds, deadline.left()))
        after, precise_after = rig.snapshot(), schedstat_seconds(pid)
        span = after.at - before.at
        cpu = after.cpu_s - before.cpu_s
        precise = (precise_after - precise_before
                   if precise_before is not None and precise_after is not None else None)
        result = {
            "scenario": "idle", "messages": 0, "duration_s": round(span, 2),
            "idle_cpu_percent_of_one_core": round(
                (precise if precise is not None else cpu) / span * 100, 3),
            "cpu_source": "schedstat (ns)" if precise is not None else "stat (10 ms ticks)",
            "bridge_cpu_s": round(cpu, 3),
            "peak_rss_mb": round(status_kb(pid, "VmHWM") / 1024, 1),
            "rss_mb": round(status_kb(pid, "VmRSS") / 1024, 1),
            "bytes_written_per_s": round((after.written - before.written) / span, 1),
            "requests": rig.sink.progress()["requests"],
            "timeout": span < seconds - 0.5,
        }
        return _with_exit(result, rig)


# -- the instrument's own ceiling -------------------------------------------------------


def instrument_scenario(count: int, deadline: Deadline) -> dict[str, Any]:
    """Each publisher alone (no bridge: broker PUBACKs only), and the sink alone under a
    pipelined HTTP load."""
    result: dict[str, Any] = {"scenario": "instrument", "messages": count}
    for kind in sorted(PUBLISHERS):
        with Rig(f"instrument-{kind}", kind, with_bridge=False) as rig:
            assert rig.publisher is not None
            seconds = burst(rig.publisher, count, deadline)
            result[f"publisher_{kind}_msg_per_s"] = round(count / seconds, 1)
    with Rig("instrument-sink", with_bridge=False) as rig:
        requests = count * 2
        seconds = asyncio.run(_hammer_sink(rig.sink.port, requests))
        seen = rig.sink.progress()
        result.update({"sink_requests": requests, "sink_recorded": seen["deliveries"],
                       "sink_req_per_s": round(requests / seconds, 1)})
    return result


def _sample_body(seq: int) -> bytes:
    event = {"id": "evt_01JD7X4Q3V5ZK8ABCDEFGHJKMN", "type": "telemetry", "source": "bench",
             "topic": "bench/dev-0/data", "device_id": "dev-0",
             "received_at": "2026-01-01T00:00:00.000Z", "labels": {},
             "payload": json.loads(payload(seq, "dev-0"))}
    return json.dumps(event, separators=(",", ":")).encode()


async def _hammer_sink(port: int, total: int, connections: int = 8, depth: int = 64) -> float:
    """Send ``total`` POSTs over ``connections`` keep-alive connections, ``depth`` requests
    pipelined at a time (cheap for the client, so the sink is what is measured)."""
    body = _sample_body(0)
    request = (f"POST /ingest/dev-0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    share = total // connections
    start = time.monotonic()
    await asyncio.gather(*(_pipeline(port, request, share, depth) for _ in range(connections)))
    return time.monotonic() - start


async def _pipeline(port: int, request: bytes, count: int, depth: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sent = 0
        while sent < count:
            chunk = min(depth, count - sent)
            writer.write(request * chunk)
            await writer.drain()
            await _read_responses(reader, chunk)
            sent += chunk
    finally:
        writer.close()


async def _read_responses(reader: asyncio.StreamReader, count: int) -> None:
    """Read ``count`` bodiless responses (each ends at its blank line)."""
    seen, carry = 0, b""
    while seen < count:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("sink closed the connection")
        data = carry + data
        seen += data.count(b"\r\n\r\n")
        carry = data[-3:]


# -- driver ------------------------------------------------------------------------------


def run_one(name: str, sizes: Sizes, kind: str) -> dict[str, Any]:
    deadline = Deadline(DEADLINES[name])
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "steady": lambda: burst_scenario("steady", sizes.steady, kind, deadline),
        "batch": lambda: burst_scenario("batch", sizes.batch, kind, deadline),
        "paced": lambda: paced_scenario(sizes, kind, deadline),
        "lowrate": lambda: lowrate_scenario(sizes, kind, deadline),
        "backlog": lambda: backlog_scenario(sizes.backlog, kind, deadline),
        "idle": lambda: idle_scenario(sizes.idle_s, kind, deadline),
        "instrument": lambda: instrument_scenario(sizes.steady, deadline),
    }
    try:
        return runners[name]()
    except NotSupported as exc:
        return {"scenario": name, "supported": False,
                "error": f"not supported by this build: {exc}"}
    except (RuntimeError, OSError) as exc:
        return {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="webhook-bridge benchmark (issue 7)")
    parser.add_argument("--scenario", default="all",
                        choices=[*SCENARIOS, "all", "instrument"])
    parser.add_argument("--publisher", default="raw", choices=sorted(PUBLISHERS),
                        help="load generator: raw MQTT packets (default) or paho-mqtt")
    parser.add_argument("--quick", action="store_true",
                        help="a tenth of the messages, paced for 5 s: a smoke run")
    parser.add_argument("--durability", choices=["power_loss", "process_crash"],
                        help="store.durability of the bridge (default: its default)")
    parser.add_argument("--commit-window", metavar="DURATION",
                        help="store.commit_window of the bridge (default: its default)")
    return parser.parse_args(argv)


def scenario_names(choice: str) -> Iterator[str]:
    yield from SCENARIOS if choice == "all" else (choice,)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.durability:
        STORE_EXTRA["durability"] = args.durability
    if args.commit_window:
        STORE_EXTRA["commit_window"] = args.commit_window
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    print(json.dumps({"machine": machine_info(), "git": git_state(), "quick": args.quick,
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), flush=True)
    try:
        for name in scenario_names(args.scenario):
            log(f"{name}: starting")
            load_before = os.getloadavg()[0]
            result = run_one(name, sizes, args.publisher)
            result["loadavg_1m_before"] = round(load_before, 2)
            result["publisher"] = args.publisher
            if args.quick:
                result["quick"] = True
            print(json.dumps(result), flush=True)
    except KeyboardInterrupt:
        log("interrupted; everything was torn down")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
