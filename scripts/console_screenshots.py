#!/usr/bin/env python3
"""Screenshots of the operator console for the README (docs/console/*.png).

Starts a private Mosquitto, HTTPS endpoints (one healthy but rate limited, one that
sometimes answers 503, one that refuses everything), the daemon with its admin server,
publishes telemetry for a few minutes so the per-minute pictures have something to show,
and photographs the main screens with headless chromium. Needs what the tests need
(mosquitto, chromium, chromium-driver, the [test] extras). Run from the repository root:

    .venv/bin/python scripts/console_screenshots.py [--minutes 3] [--out docs/console]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.support import (  # noqa: E402
    Certificates,
    Daemon,
    Mosquitto,
    Publisher,
    Received,
    base_config,
    free_port,
)
from tests.test_console import CHROMEDRIVER, CHROMIUM, ThreadedEndpoint  # noqa: E402

TOKEN = "screenshot-token-0123456789"


class Endpoints(ThreadedEndpoint):
    def _respond(self, received: Received) -> web.Response:
        if received.path.startswith("/erp"):
            return web.Response(status=400, text='{"error": "unknown customer id"}',
                                content_type="application/json")
        if received.path.startswith("/flaky") and random.random() < 0.25:
            return web.Response(status=503, text="upstream busy", headers={"Retry-After": "1"})
        return web.Response(status=202, text='{"accepted": true}',
                            content_type="application/json")


def publish(port: int, minutes: float, stop: threading.Event) -> None:
    """Telemetry from 12 devices at a varying rate, with one burst in the middle."""
    publisher = Publisher(port, client_id="screenshot-publisher")
    started = time.monotonic()
    seq = 0
    try:
        while not stop.is_set() and time.monotonic() - started < minutes * 60:
            elapsed = time.monotonic() - started
            rate = 3 + 2 * (elapsed // 60 % 3)
            burst = 40 if abs(elapsed - minutes * 30) < 1 else 0
            for _ in range(int(rate) + burst):
                seq += 1
                device = f"pump-{seq % 12:02d}"
                publisher.publish(f"devices/{device}/telemetry",
                                  {"seq": seq, "temp": round(18 + random.random() * 8, 1),
                                   "site": "plant-7"})
            time.sleep(1)
    finally:
        publisher.close()


def shoot(driver: webdriver.Chrome, path: Path, full: bool = True, height: int = 0) -> None:
    """Save the window (``full``: the whole page; ``height``: that many pixels of it)."""
    width = driver.execute_script("return window.innerWidth")
    original = driver.get_window_size()
    driver.execute_script("window.scrollTo(0, 0)")
    if full or height:
        page = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(original["width"], height or max(original["height"], page + 120))
    time.sleep(0.3)  # let the layout settle after the resize (a picture, not a test)
    driver.save_screenshot(str(path))
    driver.set_window_size(original["width"], original["height"])
    print(f"wrote {path} ({width} px wide)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "console"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wb-shots-"))
    certs = Certificates(tmp)
    broker = Mosquitto(tmp).start()
    endpoint = Endpoints(certs)
    port = free_port()
    tls = {"ca_file": str(certs.ca_file)}
    config = base_config(tmp, broker, [
        {"name": "cloud-ingest", "description": "Plant 7 telemetry to the cloud",
         "url": endpoint.url + "/ingest/{device_id}", "tls": tls, "events": ["telemetry"],
         "signing": {"scheme": "standard-webhooks"}, "rate_limit": "4/s", "concurrency": 2,
         "retry": {"initial": "500ms", "max": "10s"}},
        {"name": "maintenance", "description": "Pump telemetry to the maintenance app",
         "url": endpoint.url + "/flaky", "tls": tls, "filter": "payload.temp > `24`",
         "auth": {"type": "bearer", "token": "maintenance-token-123"},
         "retry": {"initial": "200ms", "max": "2s"}, "failure_limit": 0},
        {"name": "legacy-erp", "description": "Old ERP import (being migrated)",
         "url": endpoint.url + "/erp", "tls": tls, "failure_limit": 3,
         "auth": {"type": "header", "name": "X-AUTH-TOKEN", "value": "erp-secret-value"}},
    ])
    config["admin"] = {"listen": f"127.0.0.1:{port}", "token": TOKEN}
    daemon = Daemon(tmp, config).start()
    stop = threading.Event()
    driver = None
    try:
        deadline = time.monotonic() + 20
        while '"mqtt connected"' not in daemon.output():
            if daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(daemon.output())
            time.sleep(0.1)
        feeder = threading.Thread(target=publish, args=(broker.port, args.minutes, stop))
        feeder.start()
        print(f"publishing for {args.minutes} minutes ...")
        feeder.join()
        time.sleep(12)  # one more queue sample after the last message (a picture)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--hide-scrollbars", "--force-device-scale-factor=1"):
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.set_window_size(1280, 800)
        wait = WebDriverWait(driver, 20)
        origin = f"http://127.0.0.1:{port}"
        driver.get(origin + "/")
        shoot(driver, out / "signin.png", full=False)
        driver.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-name='legacy-erp']"))
        time.sleep(2.5)  # one poll later: every counter filled in
        shoot(driver, out / "list.png", full=False)
        driver.execute_script("location.hash = '#/webhook/cloud-ingest'")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attempts tbody tr td.mono"))
        shoot(driver, out / "detail.png", height=1350)
        driver.execute_script("location.hash = '#/webhook/legacy-erp'")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#dead tbody tr"))
        driver.find_element(By.CSS_SELECTOR, "#dead tbody tr button").click()
        wait.until(lambda d: d.find_element(By.ID, "dead-response").text)
        shoot(driver, out / "dead-letters.png")
        driver.execute_script("location.hash = '#/new'")
        wait.until(lambda d: d.find_elements(By.ID, "f-name"))
        for field, value in (("f-name", "quality-lab"),
                             ("f-description", "Lab samples to the quality system"),
                             ("f-url", endpoint.url + "/lab/{device_id}"),
                             ("f-tls-ca-file", str(certs.ca_file)), ("f-timeout", "5s"),
                             ("f-headers", "X-Site: plant-7")):
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "label[for='f-events-0']").click()
        Select(driver.find_element(By.ID, "f-auth-type")).select_by_value("bearer")
        driver.find_element(By.ID, "f-auth-token").send_keys("lab-token-0042")
        Select(driver.find_element(By.ID, "f-signing-scheme")).select_by_value("hmac-sha256")
        driver.find_element(By.ID, "f-retry-max").send_keys("10 minutes")
        driver.find_element(By.ID, "check").click()
        wait.until(lambda d: d.find_element(By.ID, "f-retry-max-err").text)
        shoot(driver, out / "form-errors.png")
        retry_max = driver.find_element(By.ID, "f-retry-max")
        retry_max.clear()
        retry_max.send_keys("10m")
        driver.find_element(By.ID, "test-send").click()
        wait.until(lambda d: d.find_elements(By.ID, "test-response"))
        driver.execute_script("document.getElementById('test-result').scrollIntoView()")
        shoot(driver, out / "form-test.png")
        driver.set_window_size(390, 844)
        driver.execute_script("location.hash = '#/'")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-name='legacy-erp']"))
        time.sleep(0.5)
        shoot(driver, out / "list-phone.png", full=False)
    finally:
        stop.set()
        if driver is not None:
            driver.quit()
        daemon.terminate()
        endpoint.close()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
