"""The operator console (SPEC §9) in a real browser: Debian's chromium driven headless by
Selenium against the real daemon (a subprocess with its admin server), a real Mosquitto
and real HTTPS endpoints (aiohttp + trustme, served from a thread of their own because
Selenium blocks). One browser and one daemon serve the whole module; the tests run in
order and build on each other, as an operator's session would."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from aiohttp import web

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    Received,
    base_config,
    free_port,
    https_webhook,
)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKEN = "console-token-0123456789abcdef"
BEARER = "endpoint-bearer-secret-4711"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")


class ThreadedEndpoint:
    """An HTTPS :class:`Endpoint` on an event loop in its own thread."""

    def __init__(self, certs: Certificates) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fail = True  # /fail answers 400 (echoing the request's Authorization) while set
        self.server = self._run(Endpoint(ssl_context=certs.server_context(),
                                         responder=self._respond).start())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(20)

    def _respond(self, received: Received) -> web.Response:
        if received.path.startswith("/fail") and self.fail:
            return web.Response(status=400, text="bad request; you sent Authorization: "
                                + received.headers.get("Authorization", ""))
        return web.Response(status=200, text="ok")

    @property
    def url(self) -> str:
        return self.server.url

    def requests(self, path: str) -> list[Received]:
        return [r for r in list(self.server.requests) if r.path == path]

    def close(self) -> None:
        self._run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Console:
    """What the tests share: the daemon, its admin origin, the browser and the endpoint."""

    def __init__(self, daemon: Daemon, origin: str, driver: Any, endpoint: ThreadedEndpoint,
                 broker: Mosquitto, certs: Certificates, rss_before: int) -> None:
        self.daemon, self.origin, self.driver = daemon, origin, driver
        self.endpoint, self.broker, self.certs = endpoint, broker, certs
        self.rss_before = rss_before

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
        """Wait with a deadline (Selenium's own polling wait), naming what failed."""
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: condition(), message=f"timed out waiting for {what}")

    def find(self, css: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Click ``css`` once the page has drawn it (views fill in after their first
        answers arrive)."""
        element = self.wait(lambda: next((e for e in self.driver.find_elements(
            By.CSS_SELECTOR, css) if e.is_displayed() and e.is_enabled()), None), css)
        element.click()

    def text(self, css: str) -> str:
        try:
            return self.find(css).text
        except WebDriverException:
            return ""

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.origin + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def row(self, name: str, column: str) -> str:
        return self.text(f"#webhooks tr[data-name='{name}'] td.c-{column}")

    def publish(self, device: str, payload: dict[str, Any]) -> None:
        publisher = Publisher(self.broker.port, client_id=f"console-{time.monotonic_ns()}")
        try:
            publisher.publish(f"devices/{device}/telemetry", payload).wait_for_publish(10)
        finally:
            publisher.close()

    def browser_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def go(self, hash_: str) -> None:
        self.driver.execute_script("location.hash = arguments[0]", hash_)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, certs: Certificates
            ) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    broker = Mosquitto(tmp).start()
    endpoint = ThreadedEndpoint(certs)
    port = free_port()
    config = base_config(tmp, broker, [
        https_webhook("plant", endpoint.server, certs, "/plant",
                      description="Plant 7 telemetry"),
        https_webhook("failing", endpoint.server, certs, "/fail",
                      failure_limit=1, auth={"type": "bearer", "token": BEARER},
                      sources=["telemetry"], filter="device_id == 'bad'"),
    ])
    config["admin"] = {"listen": f"127.0.0.1:{port}", "token": TOKEN}
    daemon = Daemon(tmp, config).start()
    driver = None
    try:
        origin = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while '"mqtt connected"' not in daemon.output():
            assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)
        rss_before = rss(daemon.proc.pid)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,800",
                         "--no-first-run", "--disable-extensions",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-default-apps"):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
        driver.set_window_size(1280, 800)
        yield Console(daemon, origin, driver, endpoint, broker, certs, rss_before)
    finally:
        if driver is not None:
            driver.quit()
        daemon.terminate()
        endpoint.close()
        broker.stop()


# -- the tests, in the order an operator works ------------------------------------------

def test_a_wrong_token_sees_nothing_but_the_sign_in_page(console: Console) -> None:
    driver = console.driver
    driver.get(console.origin + "/")
    token = console.find("#token")
    token.send_keys("wrong-token", Keys.ENTER)
    console.wait(lambda: "Wrong token" in console.text("#signin-error"), "the refusal")
    assert console.find("#signin").is_displayed()
    assert not console.find("#nav").is_displayed()
    assert driver.execute_script("return document.getElementById('view').childElementCount") == 0
    page = driver.page_source
    for secret_or_data in ("plant", "failing", "Plant 7", BEARER):
        assert secret_or_data not in page
    assert driver.execute_script("return sessionStorage.length") == 0
    # The only console messages are the refused request's own 401 (the log may reach
    # the driver a moment after the page showed the refusal).
    errors: list[dict[str, Any]] = []
    console.wait(lambda: errors.extend(console.browser_errors()) or errors,
                 "the refused request in the browser's log")
    assert all("/api/v1/console" in e["message"] and "401" in e["message"]
               for e in errors), errors


def test_sign_in_and_see_the_list_update_live(console: Console) -> None:
    driver = console.driver
    console.find("#token").send_keys(TOKEN, Keys.ENTER)
    console.wait(lambda: console.row("plant", "name") == "plant", "the webhooks list")
    assert console.row("plant", "description") == "Plant 7 telemetry"
    assert console.row("plant", "status") == "enabled"
    assert console.row("plant", "delivered") == "0"
    assert console.row("failing", "name") == "failing"
    headers = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#webhooks thead th")]
    assert headers == ["Name", "Description", "State", "Queued", "In flight", "Delivered",
                       "Failed", "Dead", "Attempts", "Consecutive failures",
                       "Last triggered", "Last error"]
    # The token is in this tab's sessionStorage only: not in the URL, no cookie.
    assert TOKEN not in driver.current_url
    assert driver.get_cookies() == []
    assert driver.execute_script("return sessionStorage.getItem('webhook-bridge.token')") \
        == TOKEN
    driver.execute_script("window.notReloaded = true")
    console.publish("d1", {"temp": 20})
    console.wait(lambda: console.row("plant", "delivered") == "1", "the delivery counted")
    assert console.row("plant", "attemptCount") == "1"
    assert console.row("plant", "lastTriggeredTs").endswith("ago")
    assert driver.execute_script("return window.notReloaded") is True
    assert len(console.endpoint.requests("/plant")) == 1
    assert console.browser_errors() == []


def fill(console: Console, values: dict[str, str]) -> None:
    for field_id, value in values.items():
        element = console.find("#" + field_id)
        element.clear()
        element.send_keys(value)


def test_create_a_webhook_through_the_form(console: Console) -> None:
    driver = console.driver
    console.click("nav a[href='#/new']")
    console.wait(lambda: console.text("#form-title") == "New webhook", "the form")
    # Every input of the form has a label.
    assert driver.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => e.labels.length === 0).map(e => e.id)") == []
    fill(console, {"f-name": "created", "f-description": "made in the console",
                   "f-url": console.endpoint.url + "/created/{device_id}",
                   "f-tls-ca-file": str(console.certs.ca_file), "f-timeout": "soon",
                   "f-headers": "X-Site: plant-7", "f-retry-initial": "100ms"})
    console.click("label[for='f-events-0']")  # telemetry
    assert console.find("#f-events").get_attribute("value") == "telemetry"
    Select(console.find("#f-signing-scheme")).select_by_value("standard-webhooks")
    console.click("#save")
    # The loader's own message, next to its field.
    console.wait(lambda: "timeout: invalid duration 'soon'" in console.text("#f-timeout-err"),
                 "the timeout error next to its field")
    assert console.find("#f-timeout").get_attribute("aria-invalid") == "true"
    assert driver.switch_to.active_element.get_attribute("id") == "f-timeout"
    assert console.api("GET", "/api/v1/webhooks/created")[0] == 404
    fill(console, {"f-timeout": "5s"})
    console.click("#save")
    console.wait(lambda: console.text("#detail-title") == "created", "the new webhook's page")
    conf = console.daemon.config_path.parent / "conf.d" / "created.yaml"
    saved = yaml.safe_load(conf.read_text())["webhooks"][0]
    assert saved == {"name": "created", "url": console.endpoint.url + "/created/{device_id}",
                     "description": "made in the console", "events": ["telemetry"],
                     "headers": {"X-Site": "plant-7"},
                     "signing": {"scheme": "standard-webhooks"},
                     "tls": {"ca_file": str(console.certs.ca_file)}, "timeout": "5s",
                     "retry": {"initial": "100ms"}}
    console.publish("d7", {"temp": 31})
    console.wait(lambda: len(console.endpoint.requests("/created/d7")) == 1, "the delivery")
    request = console.endpoint.requests("/created/d7")[0]
    assert request.headers["X-Site"] == "plant-7"
    assert request.headers["webhook-signature"].startswith("v1,")
    console.wait(lambda: console.text("[data-counter='Delivered'] dd") == "1",
                 "the first delivery counted on the page")
    console.wait(lambda: console.text("#attempts tbody tr td:nth-child(3)") == "delivered",
                 "the attempt listed")
    cells = [td.text for td in driver.find_elements(By.CSS_SELECTOR,
                                                    "#attempts tbody tr:first-child td")]
    assert cells[1] == request.headers["webhook-id"] and cells[3] == "200", cells
    assert cells[4].endswith(" ms")
    bars = driver.find_elements(By.CSS_SELECTOR, "#chart-deliveries rect.bar-delivered")
    assert len(bars) == 1
    assert bars[0].find_element(By.TAG_NAME, "title").get_attribute("textContent") \
        .endswith("delivered: 1")
    assert console.browser_errors() == []


def test_rotate_the_signing_secret_shows_it_once(console: Console) -> None:
    console.click("#rotate")
    secret = console.wait(lambda: console.text("#new-secret"), "the new secret")
    assert secret.startswith("whsec_")
    shown = console.daemon.cli("secret", "show", "created")
    assert f"current: {secret}" in shown.stdout, shown.stdout + shown.stderr
    console.click(".secret button")
    assert console.driver.find_elements(By.CSS_SELECTOR, "#new-secret") == []
    assert secret not in console.driver.page_source


def test_send_a_test_event_from_the_unsaved_form(console: Console) -> None:
    console.go("#/new")
    console.wait(lambda: console.text("#form-title") == "New webhook", "the form")
    fill(console, {"f-name": "trial", "f-url": console.endpoint.url + "/trial",
                   "f-tls-ca-file": str(console.certs.ca_file)})
    Select(console.find("#f-auth-type")).select_by_value("bearer")
    fill(console, {"f-auth-token": "trial-token-secret-99"})
    console.click("#test-send")
    shown = console.wait(lambda: console.text("#test-response"), "the test result")
    assert shown.startswith("HTTP 200")
    assert shown.endswith("ok")
    request_text = console.text("#test-request")
    assert request_text.startswith(f"POST {console.endpoint.url}/trial\n")
    assert "Authorization: Bearer ***" in request_text
    assert "trial-token-secret-99" not in console.driver.page_source
    sent = console.endpoint.requests("/trial")
    assert len(sent) == 1
    assert sent[0].headers["Authorization"] == "Bearer trial-token-secret-99"
    body = request_text.split("\n\n", 1)[1]
    assert json.loads(body) == sent[0].json()
    assert sent[0].json()["device_id"] == "test-device"
    assert console.api("GET", "/api/v1/webhooks/trial")[0] == 404  # tested, not saved
    assert console.browser_errors() == []


def test_a_cli_disable_shows_without_a_reload_and_the_page_enables(console: Console) -> None:
    driver = console.driver
    console.go("#/")
    console.wait(lambda: console.row("plant", "status") == "enabled", "the list")
    driver.execute_script("window.notReloaded = true")
    result = console.daemon.cli("disable", "plant")
    assert result.returncode == 0, result.stderr
    console.wait(lambda: console.row("plant", "status") == "disabled", "the CLI's disable")
    assert driver.execute_script("return window.notReloaded") is True
    console.click("#webhooks tr[data-name='plant'] a")
    console.wait(lambda: console.text("#detail-title") == "plant", "the detail page")
    console.click("#enable")
    console.wait(lambda: console.text(".badge") == "enabled", "enabled from the page")
    status = json.loads(console.daemon.cli("status", "--json").stdout)
    assert {w["name"]: w["state"] for w in status["webhooks"]}["plant"] == "ENABLED"
    console.click("#disable")
    console.wait(lambda: console.text(".badge") == "disabled", "disabled from the page")
    console.click("#enable")
    console.wait(lambda: console.text(".badge") == "enabled", "enabled again")
    assert console.browser_errors() == []


def test_re_enable_after_errors_and_replay_a_dead_letter(console: Console) -> None:
    driver = console.driver
    console.go("#/webhook/failing")
    console.wait(lambda: console.text("#detail-title") == "failing", "the detail page")
    console.publish("bad", {"temp": 99})
    console.wait(lambda: console.text(".badge") == "disabled after errors",
                 "DISABLED_DUE_TO_ERRORS", timeout=30)
    console.wait(lambda: "Disabled after errors: 1 consecutive failures" in
                 console.text(".reason"), "the reason")
    console.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr"),
                 "the dead letter listed")
    first = console.endpoint.requests("/fail")[0]
    row = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr td")]
    assert row[1] == first.headers["webhook-id"] and row[4] == "400", row
    console.click("#dead tbody tr button[aria-label^='Inspect']")
    excerpt = console.wait(lambda: console.text("#dead-response"), "the inspected letter")
    assert excerpt == "bad request; you sent Authorization: Bearer ***"
    assert BEARER not in driver.page_source
    console.endpoint.fail = False
    console.click("#enable")
    console.wait(lambda: console.text(".badge") == "enabled", "re-enabled")
    console.click("#dead tbody tr button[aria-label^='Replay']")
    console.wait(lambda: len(console.endpoint.requests("/fail")) == 2, "the replayed delivery")
    replayed = console.endpoint.requests("/fail")[1]
    assert replayed.headers["webhook-id"] == first.headers["webhook-id"]
    assert replayed.body == first.body
    console.wait(lambda: console.text("#dead-info") == "No dead letters.",
                 "the dead letters emptied")
    assert not driver.find_elements(By.CSS_SELECTOR, "#dead tbody tr")
    console.wait(lambda: console.text("[data-counter='Delivered'] dd") == "1",
                 "the replay delivered")
    console.wait(lambda: console.text("#attempts tbody tr:first-child td:nth-child(3)")
                 == "delivered", "the attempts, newest first")
    outcomes = [td.text for td in driver.find_elements(
        By.CSS_SELECTOR, "#attempts tbody tr td:nth-child(3)")]
    assert outcomes == ["delivered", "dead"]
    assert console.browser_errors() == []


def test_edit_and_delete_an_api_webhook(console: Console) -> None:
    driver = console.driver
    console.go("#/edit/created")
    console.wait(lambda: console.find("#f-url").get_attribute("value").endswith(
        "/created/{device_id}"), "the form filled in")
    assert console.find("#f-name").get_attribute("readonly") is not None
    assert console.find("#f-events").get_attribute("value") == "telemetry"
    assert console.find("#f-events-0").is_selected()
    fill(console, {"f-description": "changed in the console", "f-concurrency": "2"})
    console.click("#save")
    console.wait(lambda: console.text("#detail-title") == "created", "saved")
    status, got = console.api("GET", "/api/v1/webhooks/created")
    assert status == 200 and got["description"] == "changed in the console"
    assert got["concurrency"] == 2 and got["signing"] == {"scheme": "standard-webhooks"}
    console.click("#delete")
    console.click("#delete-confirm")
    console.wait(lambda: console.row("plant", "name") == "plant", "back on the list")
    console.wait(lambda: not driver.find_elements(By.CSS_SELECTOR, "tr[data-name='created']"),
                 "the webhook gone")
    assert not (console.daemon.config_path.parent / "conf.d" / "created.yaml").exists()
    assert console.browser_errors() == []


def test_phone_sized_window_and_keyboard(console: Console) -> None:
    driver = console.driver
    try:
        driver.set_window_size(390, 844)
        console.go("#/")
        console.wait(lambda: console.row("plant", "name") == "plant", "the list")
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        console.go("#/webhook/plant")
        console.wait(lambda: console.text("#detail-title") == "plant", "the detail page")
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        driver.set_window_size(1280, 800)
    console.go("#/")
    console.wait(lambda: console.row("plant", "name") == "plant", "the list")
    assert driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    # Keyboard only: Tab from the page start reaches the list's links, Enter follows one.
    driver.execute_script("document.querySelector('.skip').focus()")  # the page's first stop
    for _ in range(12):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        if driver.switch_to.active_element.text == "plant":
            break
    assert driver.switch_to.active_element.text == "plant"
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    console.wait(lambda: console.text("#detail-title") == "plant", "the page by keyboard")
    assert console.browser_errors() == []


def test_no_request_leaves_the_admin_origin(console: Console) -> None:
    driver = console.driver
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(console.origin + "/") for r in resources), resources
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert urls and all(u.startswith(console.origin + "/") or u.startswith("data:")
                        for u in urls), sorted(set(urls))


def test_security_headers_and_the_token_guard(console: Console) -> None:
    with urllib.request.urlopen(console.origin + "/", timeout=10) as response:
        headers = response.headers
        page = response.read().decode()
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "<script>" not in page and "style=" not in page
    for path in ("/api/v1/console", "/api/v1/webhooks", "/api/v1/webhooks/plant/activity",
                 "/api/v1/webhooks/plant/dead"):
        try:
            urllib.request.urlopen(console.origin + path, timeout=10)
            raise AssertionError(f"{path} answered without a token")
        except urllib.error.HTTPError as error:
            assert error.code == 401


def test_the_console_costs_the_admin_server_little_memory(console: Console) -> None:
    after = rss(console.daemon.proc.pid)
    growth = after - console.rss_before
    print(f"admin server RSS: {console.rss_before / 2**20:.1f} MB before the console, "
          f"{after / 2**20:.1f} MB after this module's session ({growth / 2**20:+.1f} MB)")
    assert growth < 10 * 2**20
