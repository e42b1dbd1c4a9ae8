"""The admin HTTP server of SPEC §7: health, readiness, Prometheus metrics, webhook REST API.

Owns the HTTP surface only: routes, the bearer-token check, the JSON shape of a webhook
(its config with secrets redacted, plus Blynk-style state fields) and the
``conf.d/<name>.yaml`` files the API writes. Validation is
:func:`bridge.config.webhook_from_mapping` (the loader's own rules), applying a change is
:meth:`Bridge.reload`, and state lives in the store; nothing here parses config by itself.

An API webhook lives in its own ``conf.d/<name>.yaml`` (mode 0600: it may hold secrets).
Webhooks from the main file or hand-written conf.d files are read-only here: the API never
rewrites a file an operator wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import yaml
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from . import console, logs
from .config import Config, ConfigError, WebhookConfig, dump_webhook, webhook_from_mapping
from .config_yaml import MAX_DEPTH, json_number
from .control import BridgeControl
from .errors import ChangeError
from .events import Event, new_id
from .proxy import redact_proxy_url
from .store import DISABLED, DISABLED_DUE_TO_ERRORS, ENABLED, oldest_queued, webhook_rows

log = structlog.get_logger("bridge.admin")

API = "/api/v1/webhooks"
REDACTED = "***"
SECRET_KEYS = ("password", "token", "value", "client_secret", "secret")
SECRET_SECTIONS = ("auth", "signing")
# A webhook's JSON field -> its column in the store's webhook_rows (times: seconds -> ms).
COUNTERS = {"attemptCount": "attempts", "queued": "queued", "inFlight": "in_flight",
            "delivered": "delivered",
            "failed": "failed", "dead": "dead_letters",
            "consecutiveFailures": "consecutive_failures"}
TIMES = {"createdAt": "created", "lastModifiedTs": "modified",
         "lastTriggeredTs": "last_triggered"}
# Output-only fields: a client may PUT back what it GOT, so they are accepted and ignored.
READ_ONLY = ("source", "lastError", *COUNTERS, *TIMES)
RESPONSE_EXCERPT = 1000
SAMPLE_PAYLOAD: dict[str, Any] = {"temp": 21.5}
_NAME = re.compile(r"[a-z0-9_-]+")
_FILE_HEADER = ("# Written by the webhook-bridge admin API (/api/v1/webhooks); change it\n"
                "# through the API: PUT replaces this file, DELETE removes it.\n")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reject(Exception):
    """Answer the request with ``status`` and the JSON ``body`` (raised from helpers)."""

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reject:
    return Reject(status, {"error": message}, headers)


class AdminServer:
    """The admin server of one running bridge, seen through :class:`BridgeControl`
    (``listen`` overrides ``admin.listen``; ``None`` there disables the server)."""

    def __init__(self, bridge: BridgeControl, listen: str | None = None) -> None:
        self.bridge = bridge
        self.listen = listen if listen is not None else bridge.config.admin.listen
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()  # one config change (file + reload) at a time
        self._gauged: set[str] = set()

    @property
    def config(self) -> Config:
        return self.bridge.config  # re-read on every request: a reload replaces it

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self.listen is None:
            return
        app = web.Application(middlewares=[self._errors, self._auth])
        app.add_routes([
            web.get("/healthz", self.healthz), web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get(API, self.list_webhooks), web.post(API, self.create),
            web.get(API + "/{name}", self.get), web.put(API + "/{name}", self.update),
            web.delete(API + "/{name}", self.delete),
            web.post(API + "/{name}/test", self.test),
            web.post(API + "/{name}/enable", self.enable),
            web.post(API + "/{name}/disable", self.disable),
        ])
        console.setup(app, self)  # the operator console at / (SPEC §9)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = self.listen.rpartition(":")
        await web.TCPSite(self._runner, host.strip("[]"), int(port)).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("admin server listening", listen=f"{host}:{self.port}",
                 api="enabled" if self.config.admin.token else "disabled (no admin.token)")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middlewares --------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer is JSON, errors included (aiohttp's own 404/405 are text)."""
        try:
            return await handler(request)
        except Reject as reject:
            return web.json_response(reject.body, status=reject.status, headers=reject.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
            return web.json_response({"error": exc.reason}, status=exc.status, headers=keep)
        except Exception as exc:
            log.exception("admin request failed", method=request.method, path=request.path)
            return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                     status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        token = self.config.admin.token
        if not token:
            # Never run an unauthenticated write API, not even on loopback.
            raise _error(403, "the admin API is disabled because no token is configured; "
                         "set admin.token_file to a file holding a long random token")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()):
            log.warning("admin API request refused: bad or missing token",
                        method=request.method, path=request.path, remote=request.remote)
            raise _error(401, "missing or wrong bearer token; send the header "
                         "'Authorization: Bearer <admin token>'",
                         {"WWW-Authenticate": 'Bearer realm="webhook-bridge"'})
        return await handler(request)

    # -- health and metrics -------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        bridge = self.bridge
        body: dict[str, Any] = {"ready": bridge.ready, "mqtt": bridge.mqtt_connected,
                                "store": not bridge.store.failed}
        if bridge.failed_change is not None:  # still running the previous config
            body["failed_change"] = bridge.failed_change
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        await self._refresh_gauges()
        # Prometheus text format unless the scraper asks for OpenMetrics.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.bridge.metrics.registry),
                            headers={"Content-Type": content_type})

    async def _refresh_gauges(self) -> None:
        """Mirror the store into the gauges (done per scrape; the hot path pays nothing)."""
        metrics, config = self.bridge.metrics, self.config
        rows = await self.bridge.store.read(webhook_rows)
        oldest = await self.bridge.store.read(oldest_queued)
        now = time.time()
        names = {w.name for w in config.webhooks} | set(rows)
        for name in names:
            row = rows.get(name, {})
            metrics.queue_depth.labels(name).set(row.get("queued", 0))
            created = oldest.get(name)
            metrics.oldest_queued.labels(name).set(max(now - created, 0.0) if created else 0)
            metrics.dead_letters.labels(name).set(row.get("dead_letters", 0))
            metrics.set_state(name, _status(config.webhook(name), row))
        for gone in self._gauged - names:  # deleted webhooks leave no stale series
            for gauge in (metrics.queue_depth, metrics.dead_letters, metrics.oldest_queued):
                _remove(gauge, gone)
            for state in (ENABLED, DISABLED, DISABLED_DUE_TO_ERRORS):
                _remove(metrics.webhook_state, gone, state)
        self._gauged = names
        metrics.queue_bytes.set(self.bridge.store.bytes_queued)
        metrics.mqtt_connected.set(1 if self.bridge.mqtt_connected else 0)

    # -- reading webhooks ---------------------------------------------------------------

    async def list_webhooks(self, request: web.Request) -> web.Response:
        rows = await self.bridge.store.read(webhook_rows)
        return web.json_response({"webhooks": [self._describe(w, rows.get(w.name, {}))
                                               for w in self.config.webhooks]})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(await self._current(self._webhook(request).name))

    async def _current(self, name: str) -> dict[str, Any]:
        rows = await self.bridge.store.read(webhook_rows)
        webhook = self.config.webhook(name)
        if webhook is None:  # removed by a concurrent change
            raise _error(404, f"no webhook named {name!r}")
        return self._describe(webhook, rows.get(name, {}))

    def _describe(self, webhook: WebhookConfig, row: dict[str, Any]) -> dict[str, Any]:
        data = redact(dump_webhook(webhook))
        data["status"] = _status(webhook, row)
        data["source"] = "api" if self._managed(webhook.name) else "config"
        data["failureLimit"] = webhook.failure_limit
        data.update({key: row.get(column, 0) for key, column in COUNTERS.items()})
        data.update({key: _ms(row.get(column)) for key, column in TIMES.items()})
        data["lastError"] = row.get("last_error")
        return data

    def _webhook(self, request: web.Request) -> WebhookConfig:
        name = request.match_info["name"]
        webhook = self.config.webhook(name)
        if webhook is None:
            raise _error(404, f"no webhook named {name!r}")
        return webhook

    # -- changing webhooks --------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        state = _take_state(body)
        webhook = await self._checked(body, str(body.get("name", "?")))
        name = webhook.name
        async with self._lock:
            if self.config.webhook(name) is not None or os.path.exists(self._file(name)):
                raise _error(409, f"a webhook named {name!r} exists already; PUT "
                             f"{API}/{name} changes it")
            await self._apply(name, _yaml(webhook))
            await self.bridge.store.write(self._stamp(name, created=True))
            await self.bridge.set_webhook_state(name, state or ENABLED)
        log.info("webhook created via API", webhook=name, remote=request.remote)
        return web.json_response(await self._current(name), status=201,
                                 headers={"Location": f"{API}/{name}"})

    async def update(self, request: web.Request) -> web.Response:
        current = self._webhook(request)
        name = current.name
        self._check_managed(name)  # before the body: a file webhook is never changed here
        body = await _json_object(request)
        state = _take_state(body)
        if body.setdefault("name", name) != name:
            raise Reject(422, {"errors": [f"name: renaming is not supported; POST {API} a new "
                                          f"webhook and DELETE {API}/{name}"]})
        webhook = await self._checked(unredact(body, dump_webhook(current)), name)
        async with self._lock:
            self._check_managed(name)
            await self._apply(name, _yaml(webhook))
            await self.bridge.store.write(self._stamp(name, created=False))
            if state is not None:
                await self.bridge.set_webhook_state(name, state)
        log.info("webhook changed via API", webhook=name, remote=request.remote)
        return web.json_response(await self._current(name))

    async def delete(self, request: web.Request) -> web.Response:
        name = self._webhook(request).name
        async with self._lock:
            self._check_managed(name)
            await self._apply(name, None)
        log.info("webhook deleted via API", webhook=name, remote=request.remote)
        return web.Response(status=204)

    async def enable(self, request: web.Request) -> web.Response:
        return await self._set_state(request, ENABLED)

    async def disable(self, request: web.Request) -> web.Response:
        return await self._set_state(request, DISABLED)

    async def _set_state(self, request: web.Request, state: str) -> web.Response:
        webhook = self._webhook(request)
        if state == ENABLED and not webhook.enabled:
            raise _error(409, f"webhook {webhook.name!r} has 'enabled: false' in its "
                         "configuration file; set it to true there (the file wins)")
        await self.bridge.set_webhook_state(webhook.name, state)
        log.info("webhook state changed via API", webhook=webhook.name, state=state,
                 remote=request.remote)
        return web.json_response(await self._current(webhook.name))

    async def _checked(self, body: dict[str, Any], name: str) -> WebhookConfig:
        """:meth:`_validate` for a change: a refused one is a failed change (logged,
        shown by ``status`` and ``/readyz``) like a reload that does not apply."""
        try:
            return self._validate(body, name)
        except Reject as reject:
            if reject.status == 422:
                await self.bridge.refuse_change(f"API change of webhook {name}",
                                                list(reject.body["errors"]))
            raise

    def _validate(self, body: dict[str, Any], name: str) -> WebhookConfig:
        config = self.config
        try:
            webhook = webhook_from_mapping(body, origin=f"api:{name}",
                                           sources=[s.name for s in config.sources],
                                           base_dir=os.path.dirname(config.path))
        except ConfigError as error:
            raise Reject(422, {"errors": error.problems}) from None
        # Secrets that arrive through the API must never show in a log line either.
        logs.register_secrets(logs.webhook_secrets(webhook))
        return webhook

    def _file(self, name: str) -> str:
        if not _NAME.fullmatch(name):  # never let a name reach the file system unchecked
            raise _error(404, f"no webhook named {name!r}")
        return os.path.join(os.path.dirname(self.config.path), "conf.d", f"{name}.yaml")

    def _managed(self, name: str) -> bool:
        """Is ``name`` an API webhook: conf.d/<name>.yaml holding exactly that webhook?"""
        try:
            with open(self._file(name), encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError, Reject):
            return False
        hooks = data.get("webhooks") if isinstance(data, dict) else None
        return (isinstance(hooks, list) and set(data) == {"webhooks"} and len(hooks) == 1
                and isinstance(hooks[0], dict) and hooks[0].get("name") == name)

    def _check_managed(self, name: str) -> None:
        if self.config.webhook(name) is None:
            raise _error(404, f"no webhook named {name!r}")
        if not self._managed(name):
            raise _error(409, f"webhook {name!r} is defined in a configuration file written by "
                         f"an operator ({self.config.path} or its conf.d/); edit that file and "
                         "reload (the API changes only the webhooks it created)")

    async def _apply(self, name: str, content: bytes | None) -> None:
        """Write (``None``: remove) conf.d/<name>.yaml and reload; if the change cannot be
        applied in full, the bridge puts the previous file back (``undo``), so disk and
        the running config stay the same, and the answer is 422 with the reason."""
        path = self._file(name)
        previous = await asyncio.to_thread(_read_bytes, path)
        await asyncio.to_thread(_replace, path, content)

        async def undo() -> None:
            await asyncio.to_thread(_replace, path, previous)

        try:
            await self.bridge.reload(f"API change of webhook {name}", undo=undo)
        except (ConfigError, ChangeError) as exc:
            raise Reject(422, {"errors": exc.problems}) from None
        except Exception as exc:
            log.error("reload after an API change failed", webhook=name,
                      cause=f"{type(exc).__name__}: {exc}")
            raise _error(500, f"the change could not be applied ({type(exc).__name__}: "
                         f"{exc}); nothing was changed") from None

    def _stamp(self, name: str, created: bool) -> Callable[[sqlite3.Connection], None]:
        """Store operation: note the creation/modification time (a state change goes
        through the bridge's one ordered path, set_webhook_state)."""
        def stamp(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute("INSERT OR IGNORE INTO webhooks (name, created, modified) "
                         "VALUES (?, ?, ?)", (name, now, now))
            conn.execute("UPDATE webhooks SET modified = ?, created = CASE WHEN ? THEN ? "
                         "ELSE created END WHERE name = ?", (now, created, now, name))

        return stamp

    # -- test -------------------------------------------------------------------------

    async def test(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        raw = await request.read()
        try:
            data = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise _error(400, "the body is not valid JSON; send an event or a payload "
                         "object, or nothing for a sample event") from None
        event = self._test_event(data)
        outcome = await self.bridge.test_send(webhook.name, event)
        log.info("test event sent via API", webhook=webhook.name, outcome=outcome.kind,
                 status=outcome.status)
        return web.json_response({
            "delivered": outcome.kind == "delivered",
            "status": outcome.status,
            "cause": outcome.cause,
            "response": (outcome.response or "")[:RESPONSE_EXCERPT] or None,
            "elapsedMs": round(outcome.elapsed * 1000),
            "eventId": event.id,
        })

    def _test_event(self, data: Any) -> Event:
        """A full envelope (it has ``type`` and ``payload``) as is; anything else is the
        payload of a sample telemetry event from ``test-device``."""
        if isinstance(data, dict) and "type" in data and (
                "payload" in data or "payload_raw" in data):
            try:
                return Event.from_envelope({"id": new_id(), **data})
            except (KeyError, TypeError, ValueError) as exc:
                raise Reject(422, {"errors": [f"event: {exc}"]}) from None
        source = self.config.sources[0].name if self.config.sources else "test"
        return Event(type="telemetry", source=source, topic="test/test-device/telemetry",
                     device_id="test-device",
                     payload=SAMPLE_PAYLOAD if data is None else data)


# -- helpers ---------------------------------------------------------------------------

def redact(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dumped webhook) with every auth and signing secret replaced by ***."""
    result = dict(data)
    for section in SECRET_SECTIONS:
        block = result.get(section)
        if isinstance(block, dict):
            result[section] = {k: REDACTED if k in SECRET_KEYS and v is not None else v
                               for k, v in block.items()}
    for path in _URL_KEYS:
        _replace_url(result, path, _hide_userinfo)
    if isinstance(result.get("proxy"), str):  # http://user:***@proxy.corp:3128
        result["proxy"] = redact_proxy_url(result["proxy"])
    return result


_URL_KEYS = (("url",), ("auth", "token_url"))  # the proxy: redact_proxy_url


def _hide_userinfo(url: str) -> str:
    """``https://user:pass@host/`` -> ``https://user:***@host/``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not sep or not at or "/" in userinfo or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"


def _url_at(data: dict[str, Any], path: tuple[str, ...]) -> str | None:
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


def _replace_url(data: dict[str, Any], path: tuple[str, ...],
                 change: Callable[[str], str]) -> None:
    *parents, key = path
    for parent in parents:
        data = data.get(parent)  # type: ignore[assignment]
        if not isinstance(data, dict):
            return
    if isinstance(data.get(key), str):
        data[key] = change(data[key])


def unredact(body: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Put the current secrets back where a PUT body says ``***`` (a body that came from a
    GET), as long as the section keeps its auth type or signing scheme."""
    for section, kind in (("auth", "type"), ("signing", "scheme")):
        new, old = body.get(section), current.get(section)
        if not isinstance(new, dict) or not isinstance(old, dict):
            continue
        if new.get(kind) != old.get(kind):
            continue
        for key in SECRET_KEYS:
            if new.get(key) == REDACTED and key in old:
                new[key] = old[key]
    for path in _URL_KEYS:  # a URL whose password reads *** (as GET shows it) keeps it
        old_url = _url_at(current, path)
        if old_url is not None and _url_at(body, path) == _hide_userinfo(old_url) != old_url:
            _replace_url(body, path, lambda _: old_url)  # noqa: B023 (called right here)
    old_proxy = current.get("proxy")
    if isinstance(old_proxy, str) and body.get("proxy") == redact_proxy_url(old_proxy):
        body["proxy"] = old_proxy
    return body


def _take_state(body: dict[str, Any]) -> str | None:
    """Pop the output-only keys; return the ``status`` a client asked for (or None)."""
    status = body.pop("status", None)
    for key in READ_ONLY:
        body.pop(key, None)
    if "failureLimit" in body:  # Blynk's name for failure_limit
        body.setdefault("failure_limit", body.pop("failureLimit"))
    if status is None or status == DISABLED_DUE_TO_ERRORS:
        return None  # set by the bridge only (Blynk semantics), ignored on input
    if status in (ENABLED, DISABLED):
        return str(status)
    raise Reject(422, {"errors": [f"status: unknown value {status!r}; use ENABLED or "
                                  "DISABLED"]})


def _loads(text: str) -> Any:
    # Long numbers stay text, refused with check's message (int() of them is slow).
    return json.loads(text, parse_int=json_number)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=_loads)
    except ValueError:
        raise _error(400, "the body is not valid JSON; send the webhook as a JSON object "
                     "with the same keys as in YAML") from None
    except RecursionError:  # what `check` says of a file nested as deep
        raise Reject(422, {"errors": [f"body: nested deeper than {MAX_DEPTH} levels; "
                                      "flatten it"]}) from None
    if not isinstance(data, dict):
        raise Reject(422, {"errors": ["body: expected a JSON object with the webhook's keys "
                                      "(name, url, ...)"]})
    return data


def _status(webhook: WebhookConfig | None, row: dict[str, Any]) -> str:
    if webhook is not None and not webhook.enabled:
        return DISABLED  # 'enabled: false' in the file wins over the stored state
    return str(row.get("state", ENABLED))


def _ms(ts: float | None) -> int | None:
    return int(ts * 1000) if ts is not None else None


def _yaml(webhook: WebhookConfig) -> bytes:
    # dump_webhook escapes "${" as "$${", so the loader reads the values back unchanged.
    text = yaml.safe_dump({"webhooks": [dump_webhook(webhook)]}, sort_keys=False,
                          allow_unicode=True)
    return (_FILE_HEADER + text).encode("utf-8")


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _replace(path: str, content: bytes | None) -> None:
    """Atomically write ``content`` to ``path`` (0600, fsynced), or remove it for None."""
    directory = os.path.dirname(path)
    if content is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
    else:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        # The ".tmp" suffix keeps a half-written file out of the loader's conf.d/*.yaml.
        fd, temp = tempfile.mkstemp(prefix=".api-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename (or unlink) itself survive a power cut
    finally:
        os.close(dir_fd)


def _remove(gauge: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
