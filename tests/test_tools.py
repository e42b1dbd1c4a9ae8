"""The operator tools as an operator runs them: ``listen``, ``demo`` and ``secret`` as real
subprocesses, ``test --event`` on a config file. Requests to ``listen`` are signed with the
reference ``standardwebhooks`` package, not with our own code."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from standardwebhooks.webhooks import Webhook

from .support import ROOT, free_port, run_cli, wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Process:
    """A CLI subprocess whose stdout is collected line by line while it runs."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self._reader.join(5)
        return code


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def signed(msg_id: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    now = datetime.now(tz=timezone.utc)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode())}


async def test_listen_prints_deliveries_and_verifies_signatures() -> None:
    port = free_port()
    listener = Process("listen", "--port", str(port), "--secret", SECRET)
    url = f"http://127.0.0.1:{port}/ingest/d1?x=1"
    try:
        await wait_for(lambda: "listening on" in listener.output
                       or listener.proc.poll() is not None, 15, "listen to start")
        body = json.dumps({"id": "evt_1", "payload": {"temp": 21.5}}).encode()
        status, answer = await asyncio.to_thread(post, url, body, signed("evt_1", body))
        assert (status, answer) == (200, {"ok": True})
        await wait_for(lambda: "signature: valid" in listener.output, what="the first block")
        block = listener.output
        assert "POST /ingest/d1?x=1" in block
        assert re.search(r"(?i)^webhook-id: evt_1$", block, re.MULTILINE)
        assert re.search(r"(?i)^webhook-signature: v1,", block, re.MULTILINE)
        assert "signature: valid (standard-webhooks)" in block
        assert '"temp": 21.5' in block  # pretty-printed JSON

        # The same signature on a tampered body: 401, and said so.
        tampered = body.replace(b"21.5", b"99.9")
        status, _ = await asyncio.to_thread(post, url, tampered, signed("evt_2", body))
        assert status == 401
        await wait_for(lambda: "signature: INVALID" in listener.output, what="the 401 block")

        # Biotz style: t=<ts>,v1=<hex HMAC-SHA256(secret, ts.body)>, trailing comma and all.
        stamp = str(int(time.time()))
        digest = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body,
                          hashlib.sha256).hexdigest()
        status, _ = await asyncio.to_thread(
            post, url, body, {"Biotz-IoT-Signature": f"t={stamp},v1={digest},"})
        assert status == 200
        await wait_for(lambda: "valid (hmac-sha256" in listener.output, what="hmac block")

        status, _ = await asyncio.to_thread(post, url, b'{"plain": true}', {})
        assert status == 200
        await wait_for(lambda: "signature: none" in listener.output, what="unsigned block")
    finally:
        assert listener.stop() == 0, listener.output


async def test_demo_runs_alone_and_stops_after_count() -> None:
    started = time.monotonic()
    demo = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "demo"], capture_output=True,
        text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WEBHOOK_BRIDGE_DEMO_COUNT": "3"})
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert time.monotonic() - started < 30
    deliveries = [line for line in demo.stdout.splitlines()
                  if re.match(r"^#\d+ .* <- POST /ingest/demo-1 ", line)]
    assert len(deliveries) == 3, demo.stdout
    assert all("signature valid (standard-webhooks)" in line for line in deliveries)
    assert [json.loads(re.search(r"telemetry (\{.*?\})", line).group(1))["seq"]
            for line in deliveries] == [1, 2, 3]
    assert "mosquitto_pub" in demo.stdout and "Traceback" not in demo.stderr


def secret_config(tmp: Path) -> str:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(tmp / "state" / "queue.db")},
        "sources": [{"name": "telemetry", "topic": "devices/{device_id}/telemetry"}],
        "webhooks": [
            {"name": "generated", "url": "https://a.example.com/",
             "signing": {"scheme": "standard-webhooks"}},
            {"name": "configured", "url": "https://b.example.com/",
             "signing": {"scheme": "hmac-sha256", "secret": SECRET}},
            {"name": "unsigned", "url": "https://c.example.com/"},
        ]}))
    return str(path)


def line_value(output: str, name: str) -> str:
    match = re.search(rf"^{name}: (\S+)", output, re.MULTILINE)
    assert match, output
    return match.group(1)


def test_secret_show_and_rotate(tmp_path: Path) -> None:
    config = secret_config(tmp_path)
    shown = run_cli("secret", "show", "generated", "-c", config)
    assert shown.returncode == 0, shown.stderr
    old = line_value(shown.stdout, "current")
    assert old.startswith("whsec_") and "source: generated" in shown.stdout
    assert run_cli("secret", "show", "generated", "-c", config).stdout == shown.stdout

    rotated = run_cli("secret", "rotate", "generated", "-c", config)
    assert rotated.returncode == 0, rotated.stderr
    new = line_value(rotated.stdout, "new secret")
    assert new != old and "24 h" in rotated.stdout
    after = run_cli("secret", "show", "generated", "-c", config).stdout
    assert line_value(after, "current") == new
    previous = re.search(r"^previous: (\S+) \(still valid until (\S+)\)", after, re.MULTILINE)
    assert previous and previous.group(1) == old
    until = datetime.strptime(previous.group(2), "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc)
    assert abs(until.timestamp() - (time.time() + 86400)) < 120

    configured = run_cli("secret", "show", "configured", "-c", config)
    assert line_value(configured.stdout, "current") == SECRET
    assert "source: config" in configured.stdout
    assert "Biotz-IoT-Signature" in configured.stdout
    rotated = run_cli("secret", "rotate", "configured", "-c", config)
    assert rotated.returncode == 0, rotated.stderr
    pending = line_value(rotated.stdout, "new secret")
    assert pending != SECRET and "config" in rotated.stdout and "24 h" in rotated.stdout
    again = run_cli("secret", "show", "configured", "-c", config).stdout
    assert line_value(again, "current") == SECRET and line_value(again, "pending") == pending

    unsigned = run_cli("secret", "show", "unsigned", "-c", config)
    assert unsigned.returncode == 1 and "signing" in unsigned.stderr
    unknown = run_cli("secret", "rotate", "nope", "-c", config)
    assert unknown.returncode == 1 and "no webhook named 'nope'" in unknown.stderr


def test_test_command_reads_event_files(tmp_path: Path) -> None:
    config = secret_config(tmp_path)
    bare = tmp_path / "payload.json"
    bare.write_text(json.dumps({"temp": 30.25, "unit": "C"}))
    full = tmp_path / "event.json"
    full.write_text(json.dumps({"type": "alarm", "device_id": "boiler-2",
                                "payload": {"alarm": "overheat"}}))

    def body_of(path: Path) -> Any:
        result = run_cli("test", "generated", "--dry-run", "--event", str(path), "-c", config)
        assert result.returncode == 0, result.stderr
        head, _, rest = result.stdout.partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
        assert headers["webhook-signature"].startswith("v1,")
        return json.loads(rest.split("\n\n")[0])

    assert body_of(bare)["payload"] == {"temp": 30.25, "unit": "C"}
    event = body_of(full)
    assert (event["type"], event["device_id"], event["payload"]) == (
        "alarm", "boiler-2", {"alarm": "overheat"})
    assert event["id"].startswith("evt_") and event["source"] == "telemetry"
    missing = run_cli("test", "generated", "--event", str(tmp_path / "nope.json"),
                      "-c", config)
    assert missing.returncode == 1 and "nope.json" in missing.stderr
    unknown = run_cli("test", "nope", "--dry-run", "-c", config)
    assert unknown.returncode == 1
