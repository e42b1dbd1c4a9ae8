"""Fatal start errors are one line and exit 1 (SPEC §6); every line the daemon writes to a
non-terminal is JSON, library and asyncio output included; journald priorities."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import ROOT, free_port, temp_dir, wait_for

PYTHON_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PYTHON_ENV.pop("JOURNAL_STREAM", None)


def _config(tmp: Path, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": free_port(), "embedded": True},
        "store": {"path": str(tmp / "state" / "queue.db")},
        "admin": {"listen": None},
        "log": {"format": "auto"},
        "sources": [{"name": "t", "topic": "devices/{device_id}/t"}],
        "webhooks": [{"name": "w", "url": "http://127.0.0.1:9/x",
                      "allow_insecure_http": True}],
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", "run", "-c", str(path)],
                          capture_output=True, text=True, env=env or PYTHON_ENV, timeout=30)


def _one_fatal_line(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = json.loads(lines[0])  # not a terminal: the fatal line is JSON too
    assert line["level"] == "critical"
    return line


def _taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_embedded_broker_port_in_use_is_one_line() -> None:
    tmp = temp_dir()
    with _taken_port() as sock:
        port = sock.getsockname()[1]
        result = _run(_config(tmp, mqtt={"port": port}))
    line = _one_fatal_line(result)
    assert line["event"].startswith(f"embedded MQTT broker cannot listen on 127.0.0.1:{port}: "
                                    "Address already in use; change mqtt.port")


def test_admin_port_in_use_is_one_line() -> None:
    tmp = temp_dir()
    with _taken_port() as sock:
        port = sock.getsockname()[1]
        result = _run(_config(tmp, mqtt={"embedded": False},
                              admin={"listen": f"127.0.0.1:{port}"}))
    line = _one_fatal_line(result)
    assert line["event"].startswith(f"admin server cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("store", ["/proc/no-such-dir/queue.db", "garbage"])
def test_store_that_cannot_be_opened_is_one_line(store: str) -> None:
    tmp = temp_dir()
    if store == "garbage":
        store = str(tmp / "garbage.db")
        Path(store).write_bytes(os.urandom(3 * 4096))
    line = _one_fatal_line(_run(_config(tmp, mqtt={"embedded": False},
                                        store={"path": store})))
    assert store in line["event"]  # the wording is the store's (store_check)


def test_fatal_line_is_plain_before_logging_is_set_up() -> None:
    """``status`` and the other commands print plain text (they are not the daemon)."""
    tmp = temp_dir()
    path = _config(tmp, store={"path": "/proc/no-such-dir/queue.db"})
    result = subprocess.run([sys.executable, "-m", "bridge", "status", "-c", str(path)],
                            capture_output=True, text=True, env=PYTHON_ENV, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("webhook-bridge: cannot open the queue database ")
    assert len(result.stderr.splitlines()) == 1


JUNK = [
    b"\x00\x01\x02garbage\xff\xff",
    b"\x10\xff\xff\xff\xff\x7f",                            # remaining length too long
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x10\x0c\x00\x04MQTT\x07\x02\x00\x3c\x00\x00",        # protocol level 7
    b"\x10\x0c\x00\x04MQXX\x04\x02\x00\x3c\x00\x00",        # wrong protocol name
    b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02\xff\xfe",  # client id not UTF-8
    b"\x30\x05\x00\x01ab",                                  # PUBLISH before CONNECT
    b"",
]


async def test_junk_to_the_embedded_broker_logs_only_json() -> None:
    tmp = temp_dir()
    path = _config(tmp)
    port = yaml.safe_load(path.read_text())["mqtt"]["port"]
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bridge", "run", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, env=PYTHON_ENV)
    try:
        await wait_for(lambda: '"mqtt connected"' in log_path.read_text(), 20,
                       "the daemon to connect to its embedded broker")
        for junk in JUNK:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(junk)
        await wait_for(lambda: log_path.read_text().count('"logger": "amqtt.broker"') >= 8,
                       10, "amqtt's lines about the junk connections")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    lines = log_path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is a JSON object
    assert all(isinstance(p, dict) and "level" in p and "event" in p for p in parsed)
    assert any(p.get("logger") == "amqtt.broker" for p in parsed)
    assert parsed[-1]["event"] == "exit"


PROBE = textwrap.dedent("""
    import asyncio, logging, sys, warnings, threading
    import structlog
    from bridge import logs
    logs.setup("auto", "info")
    log = structlog.get_logger("bridge.test")
    log.info("an info line")
    log.warning("a warning line")
    log.error("an error line")
    logging.getLogger("amqtt.broker").error("No data from client")
    logging.getLogger("amqtt.broker").info("below the library level: not shown")
    warnings.warn("a library warning")

    async def main():
        loop = asyncio.get_running_loop()
        try:
            raise ValueError("boom")
        except ValueError as exc:
            loop.call_exception_handler({"message": "Unhandled exception in "
                                         "client_connected_cb", "exception": exc})
        async def fails():
            raise RuntimeError("never retrieved")
        task = loop.create_task(fails())
        await asyncio.sleep(0)
        del task
    asyncio.run(main())
    import gc; gc.collect()
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start(); thread.join()
    logs.fatal("embedded MQTT broker cannot listen on 127.0.0.1:1883: Address in use")
""")


@pytest.mark.parametrize("journal", [False, True])
def test_every_line_is_json_with_journal_priorities(journal: bool) -> None:
    tmp = temp_dir()
    out = tmp / "stderr"
    with open(out, "wb") as stream:
        env = dict(PYTHON_ENV)
        if journal:  # what systemd sets when stderr is its journal socket
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        else:
            env["JOURNAL_STREAM"] = "1:2"  # another file's: no prefix
        subprocess.run([sys.executable, "-c", PROBE], stderr=stream, env=env, check=True,
                       timeout=30, cwd=tmp)
    lines = out.read_text().splitlines()
    priorities = []
    parsed = []
    for line in lines:
        if journal:
            assert line[0] == "<" and line[2] == ">", line
            priorities.append(int(line[1]))
            line = line[3:]
        parsed.append(json.loads(line))
    events = [p["event"] for p in parsed]
    assert events[:4] == ["an info line", "a warning line", "an error line",
                          "No data from client"]
    assert "below the library level: not shown" not in events
    assert any("a library warning" in e for e in events)
    assert any(p["event"] == "Unhandled exception in client_connected_cb"
               and "ValueError: boom" in p["exception"] for p in parsed)
    assert any("never retrieved" in json.dumps(p) for p in parsed)
    assert any(p["event"] == "uncaught exception in a thread"
               and "ZeroDivisionError" in p["exception"] for p in parsed)
    assert parsed[-1]["level"] == "critical"
    if journal:
        by_level = {p["level"]: prio for p, prio in zip(parsed, priorities, strict=True)}
        assert by_level == {"info": 6, "warning": 4, "error": 3, "critical": 2}


def test_journal_stream_detection(tmp_path: Path) -> None:
    from bridge.logs import journal_stream

    with open(tmp_path / "f", "w") as stream:
        st = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert journal_stream(stream)
            os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
            assert not journal_stream(stream)
        finally:
            del os.environ["JOURNAL_STREAM"]
        assert not journal_stream(stream)



def test_embedded_without_the_broker_extra_names_it() -> None:
    """A gateway install without ``[broker]``: ``check`` warns, ``run`` is one line."""
    tmp = temp_dir()
    blocked = tmp / "site"
    (blocked / "amqtt").mkdir(parents=True)
    (blocked / "amqtt" / "__init__.py").write_text(
        "raise ImportError('No module named amqtt (blocked by the test)')\n")
    env = {**PYTHON_ENV, "PYTHONPATH": f"{blocked}:{ROOT}"}
    path = _config(tmp)
    line = _one_fatal_line(_run(path, env))
    assert line["event"] == (
        "mqtt.embedded: true needs the embedded broker, which is not installed: pip install "
        "'mqtt-webhook-bridge[broker]' (or set mqtt.embedded: false and use a broker such "
        "as Mosquitto)")
    check = subprocess.run([sys.executable, "-m", "bridge", "check", "-c", str(path)],
                           capture_output=True, text=True, env=env, timeout=30)
    assert check.returncode == 0
    assert check.stderr == f"{path}: warning: mqtt.embedded: {line['event']}\n"
