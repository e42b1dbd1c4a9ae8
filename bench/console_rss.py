#!/usr/bin/env python3
"""The admin server's memory with the operator console open vs without.

Two daemons run side by side on the same broker with the same config and load (telemetry
at --rate msg/s to three webhooks); a headless chromium keeps the console of one of them
open (the webhook page, which polls the most: the webhook, its attempts and pictures, its
dead letters every 2 s). After --seconds both RSS values are read from /proc. Repeated
--runs times (which daemon gets the browser alternates). Run from the repository root:

    .venv/bin/python bench/console_rss.py [--runs 3] [--seconds 120] [--rate 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.support import Certificates, Daemon, Mosquitto, Publisher, base_config, free_port  # noqa: E402
from tests.test_console import CHROMEDRIVER, CHROMIUM, ThreadedEndpoint, rss  # noqa: E402

TOKEN = "rss-token-0123456789abcdef"


def daemon(tmp: Path, broker: Mosquitto, endpoint: ThreadedEndpoint, certs: Certificates
           ) -> tuple[Daemon, int]:
    tmp.mkdir()
    port = free_port()
    tls = {"ca_file": str(certs.ca_file)}
    config = base_config(tmp, broker, [
        {"name": f"hook-{n}", "url": endpoint.url + f"/{n}/{{device_id}}", "tls": tls,
         **({"signing": {"scheme": "standard-webhooks"}} if n == 0 else {})}
        for n in range(3)])
    config["admin"] = {"listen": f"127.0.0.1:{port}", "token": TOKEN}
    started = Daemon(tmp, config).start()
    deadline = time.monotonic() + 20
    while '"mqtt connected"' not in started.output():
        if started.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(started.output())
        time.sleep(0.1)
    return started, port


def load(port: int, rate: float, stop: threading.Event) -> None:
    publisher = Publisher(port, client_id=f"rss-{time.monotonic_ns()}")
    seq = 0
    try:
        while not stop.wait(1 / rate):
            seq += 1
            publisher.publish(f"devices/d{seq % 20}/telemetry", {"seq": seq, "temp": 21.5})
    finally:
        publisher.close()


def run(n: int, seconds: float, rate: float, certs: Certificates) -> tuple[int, int]:
    tmp = Path(tempfile.mkdtemp(prefix="wb-rss-"))
    broker = Mosquitto(tmp).start()
    endpoint = ThreadedEndpoint(certs)
    endpoint.fail = False
    daemons = [daemon(tmp / f"d{i}", broker, endpoint, certs) for i in range(2)]
    watched = n % 2  # which daemon has the console open alternates between runs
    stop = threading.Event()
    feeder = threading.Thread(target=load, args=(broker.port, rate, stop))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        feeder.start()
        driver.get(f"http://127.0.0.1:{daemons[watched][1]}/")
        driver.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                                                  "#webhooks tr"))
        driver.execute_script("location.hash = '#/webhook/hook-0'")
        time.sleep(seconds)  # the measured interval (a duration, not a synchronisation)
        values = [rss(d.proc.pid) for d, _ in daemons]
        return values[watched], values[1 - watched]
    finally:
        stop.set()
        feeder.join()
        driver.quit()
        for d, _ in daemons:
            d.terminate()
        endpoint.close()
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--rate", type=float, default=5)
    args = parser.parse_args()
    certs = Certificates(Path(tempfile.mkdtemp(prefix="wb-rss-certs-")))
    diffs = []
    for n in range(args.runs):
        with_console, without = run(n, args.seconds, args.rate, certs)
        diffs.append(with_console - without)
        print(f"run {n + 1}: with console {with_console / 2**20:.1f} MB, without "
              f"{without / 2**20:.1f} MB, difference {diffs[-1] / 2**20:+.2f} MB", flush=True)
    print(f"difference over {len(diffs)} runs: median {statistics.median(diffs) / 2**20:+.2f} MB,"
          f" min {min(diffs) / 2**20:+.2f}, max {max(diffs) / 2**20:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
