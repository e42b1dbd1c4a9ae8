"""Owns the operator console of SPEC §9: its static files, its security headers and the
few API calls only the console needs, on the admin server's aiohttp application.

The page (``console_static/``: one HTML file, one script, one stylesheet, nothing from
elsewhere) signs in with the admin token, keeps it in ``sessionStorage`` and sends it as
an ``Authorization`` header, so the ``/api/*`` bearer check of :mod:`bridge.admin` guards
every piece of data; the HTML shell holds none. There are no cookies, so no CSRF.

What the console reads and changes goes through the same functions as the REST API and
the CLI: :func:`bridge.config.webhook_from_mapping` validates (the rules of ``check``),
the API's POST/PUT/DELETE write ``conf.d/``, :mod:`bridge.testsend` sends test events
(as ``webhook-bridge test`` does), :mod:`bridge.store` lists, replays and purges dead
letters (on its own connection, as the CLI does), and :class:`bridge.signing.SecretKeeper`
rotates secrets (on the secrets file, as the CLI does). Recent attempts and the per-minute
picture come from :class:`bridge.attempts.Activity`; the queue depth is sampled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiohttp import web

from . import __version__, logs, testsend
from .config import ConfigError, WebhookConfig, dump_webhook, webhook_from_mapping
from .delivery import DELIVERED
from .receiver import format_body
from .render import RenderError
from .signing import SecretKeeper, SecretRotationError, SecretStoreError
from .store import connect, dead_list, dead_purge, dead_replay, webhook_rows
from .tools import KNOWN_TYPES, proxy_route, sample_event, shown_headers

if TYPE_CHECKING:
    from .admin import AdminServer
    from .control import BridgeControl

log = structlog.get_logger("bridge.console")
T = TypeVar("T")
API = "/api/v1"
QUEUE_SAMPLE_EVERY = 10.0  # seconds between queue-depth samples for the picture
DEAD_SHOWN = 200  # newest dead letters listed per webhook
STATIC: dict[str, str] = {"/": "index.html", "/console/app.js": "app.js",
                          "/console/app.css": "app.css"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# Every answer of the admin server: no framing, no sniffing, no referrer, and a policy
# that lets the page load only its own script and stylesheet and talk only to its origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def setup(app: web.Application, server: AdminServer) -> None:
    """Add the console's routes, headers and queue sampler to the admin application."""
    Console(server).install(app)


class Console:
    """The console of one admin server (its files are read once, at start)."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.files = {path: _static(name) for path, name in STATIC.items()}
        self._sampler: asyncio.Task[None] | None = None

    @property
    def bridge(self) -> BridgeControl:
        return self.server.bridge

    def install(self, app: web.Application) -> None:
        app.add_routes([web.get(path, self.static) for path in STATIC])
        hooks = API + "/webhooks/{name}"
        app.add_routes([
            web.get(API + "/console", self.meta),
            web.post(API + "/console/check", self.check),
            web.post(API + "/test", self.test_unsaved),
            web.get(hooks + "/activity", self.activity),
            web.post(hooks + "/rotate-secret", self.rotate_secret),
            web.get(hooks + "/dead", self.dead_letters),
            web.get(hooks + "/dead/{id:[0-9]+}", self.dead_letter),
            web.post(hooks + "/dead/replay", self.dead_replay),
            web.delete(hooks + "/dead", self.dead_purge),
        ])
        app.on_response_prepare.append(_secure)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    # -- the page -----------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        body, content_type = self.files[request.path]
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def meta(self, request: web.Request) -> web.Response:
        config = self.server.config
        return web.json_response({"version": __version__,
                                  "sources": [s.name for s in config.sources],
                                  "eventTypes": [*KNOWN_TYPES, "invalid"]})

    # -- the queue-depth picture ----------------------------------------------------------

    async def _start(self, app: web.Application) -> None:
        self._sampler = asyncio.create_task(self._sample(), name="console-queue-sampler")

    async def _stop(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler

    async def _sample(self) -> None:
        activity = self.bridge.metrics.activity
        while True:
            try:
                rows = await self.bridge.store.read(webhook_rows)
                names = [w.name for w in self.server.config.webhooks]
                activity.keep_only(names)
                activity.sample_queue({n: rows.get(n, {}).get("queued", 0) for n in names})
            except Exception as exc:  # a store fault shows elsewhere; the picture waits
                log.warning("queue sample failed", cause=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(QUEUE_SAMPLE_EVERY)

    async def activity(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        activity = self.bridge.metrics.activity
        attempts = [{"at": round(a.at * 1000), "eventId": a.event_id, "events": a.events,
                     "outcome": a.outcome, "status": a.status, "latencyMs": a.latency_ms,
                     "cause": redact(a.cause, webhook),
                     "excerpt": redact(a.excerpt, webhook, True) if a.excerpt else None}
                    for a in activity.attempts(webhook.name)]
        return web.json_response({"attempts": attempts, "kept": activity.kept,
                                  "series": activity.series(webhook.name)})

    # -- validation and test-send of an unsaved webhook --------------------------------

    async def check(self, request: web.Request) -> web.Response:
        """Validate a webhook as ``check`` would; 200 with the problems (an empty list:
        valid), so the page can show them next to the fields as the operator types."""
        data = await _object(request)
        try:
            self._validate(data)
        except ConfigError as error:
            return web.json_response({"errors": error.problems})
        return web.json_response({"errors": []})

    async def test_unsaved(self, request: web.Request) -> web.Response:
        """Send one sample event through the webhook in the body (saved or not): the
        exact request (credentials masked) and the response."""
        body = await _object(request)
        data = body.get("webhook")
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(reason="send {\"webhook\": {...}, \"event\": ...}")
        try:
            webhook = self._validate(data)
        except ConfigError as error:
            return web.json_response({"errors": error.problems}, status=422)
        event = sample_event(self.server.config, webhook, body.get("event"))
        try:  # the request `webhook-bridge test` and the API's test send (bridge.testsend)
            prepared = testsend.prepare(webhook, event, self._secrets())
        except (RenderError, SecretStoreError, ValueError) as exc:
            return web.json_response({"errors": [f"request: {exc}"]}, status=422)
        outcome = await testsend.send(prepared)
        rendered, headers = prepared.request, prepared.headers
        shown = shown_headers(webhook, headers)
        response = None
        if outcome.status is not None:
            response_type = (outcome.headers or {}).get("Content-Type", "")
            response = {"status": outcome.status,
                        "headers": {k: redact(v, webhook)
                                    for k, v in (outcome.headers or {}).items()},
                        "body": redact(format_body((outcome.response or "").encode(),
                                                   response_type), webhook)}
        return web.json_response({
            "request": {"method": rendered.method, "url": redact(rendered.url, webhook),
                        "headers": shown,
                        "body": redact(format_body(rendered.body,
                                                   headers.get("Content-Type", "")), webhook)},
            "response": response,
            "result": outcome.kind, "delivered": outcome.kind == DELIVERED,
            "cause": redact(outcome.cause or "", webhook) or None,
            "elapsedMs": round(outcome.elapsed * 1000), "eventId": event.id,
            "route": proxy_route(webhook, rendered.url) or None,
        })

    def _validate(self, data: dict[str, Any]) -> WebhookConfig:
        from .admin import READ_ONLY, unredact

        data = {k: v for k, v in data.items() if k not in READ_ONLY and k != "status"}
        config = self.server.config
        current = config.webhook(str(data.get("name", "")))
        if current is not None:  # an edit: '***' keeps the stored secret
            data = unredact(data, dump_webhook(current))
        return webhook_from_mapping(data, origin=f"api:{data.get('name', '?')}",
                                    sources=[s.name for s in config.sources],
                                    base_dir=os.path.dirname(config.path))

    # -- signing secret -------------------------------------------------------------------

    async def rotate_secret(self, request: web.Request) -> web.Response:
        """A new signing secret, shown once (the old one stays valid for 24 h)."""
        webhook = self._webhook(request)
        if webhook.signing is None:
            raise _reject(409, f"webhook {webhook.name!r} does not sign its requests; add "
                          "signing: {scheme: standard-webhooks} first")
        keeper = self._secrets()
        try:
            secret = await asyncio.to_thread(keeper.rotate, webhook.name,
                                             webhook.signing.secret)
            applied, note = True, ("The bridge signs with the new secret from its next "
                                   "request; the old one stays valid for 24 h.")
        except SecretRotationError as rotation:
            secret, applied = rotation.new_secret, False
            note = ("This webhook's secret is set in its configuration: put the new secret "
                    "into signing.secret and save; until then the old one signs.")
        except SecretStoreError as exc:
            raise _reject(500, str(exc)) from None
        log.info("signing secret rotated via API", webhook=webhook.name, applied=applied)
        return web.json_response({"secret": secret, "applied": applied, "note": note},
                                 headers={"Cache-Control": "no-store"})

    # -- dead letters ---------------------------------------------------------------------

    async def dead_letters(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        rows = await self._store(lambda conn: dead_list(conn, webhook.name))
        shown = [_dead_json(r, webhook) for r in rows[-DEAD_SHOWN:]]
        return web.json_response({"total": len(rows), "deadLetters": shown[::-1]})

    async def dead_letter(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        wanted = int(request.match_info["id"])
        rows = await self._store(lambda conn: dead_list(conn, webhook.name, ids=[wanted],
                                                        with_event=True))
        if not rows:
            raise _reject(404, f"no dead letter {wanted} of webhook {webhook.name!r}")
        return web.json_response(_dead_json(rows[0], webhook))

    async def dead_replay(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        ids = _ids(await _object(request, empty_ok=True))
        count = await self._store(lambda conn: dead_replay(conn, webhook.name, ids=ids))
        log.info("dead letters replayed via API", webhook=webhook.name, count=count)
        return web.json_response({"replayed": count})

    async def dead_purge(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        ids = [int(i) for i in request.query.getall("id", [])
               if i.isascii() and i.isdigit()] or None
        count = await self._store(lambda conn: dead_purge(conn, webhook.name, ids=ids))
        log.info("dead letters purged via API", webhook=webhook.name, count=count)
        return web.json_response({"purged": count})

    async def _store(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run a CLI store function on a connection of its own (the daemon follows its
        changes as it follows the CLI's)."""
        store = self.server.config.store

        def run() -> T:
            conn = connect(store.path, store.durability)
            try:
                return operation(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    def _secrets(self) -> SecretKeeper:
        """The secrets file as the CLI sees it (the daemon re-reads it when it changes)."""
        return SecretKeeper(self.server.config.state_dir)

    def _webhook(self, request: web.Request) -> WebhookConfig:
        name = request.match_info["name"]
        webhook = self.server.config.webhook(name)
        if webhook is None:
            raise _reject(404, f"no webhook named {name!r}")
        return webhook


def redact(text: str, webhook: WebhookConfig, excerpt: bool = False) -> str:
    """``text`` (from an endpoint or a rendered request) without this webhook's secrets in
    any form they travel in (also those of an unsaved webhook, which no log has
    registered) nor any the log knows; an ``excerpt`` also loses a secret cut at its end."""
    forms = {form for value in logs.webhook_secrets(webhook) if value and len(value) >= 4
             for form in logs.secret_forms(value)}
    for secret in sorted(forms, key=len, reverse=True):
        text = text.replace(secret, "***")
    return logs.printable(logs.redact_excerpt(text) if excerpt else logs.redact(text))


def _dead_json(row: dict[str, Any], webhook: WebhookConfig) -> dict[str, Any]:
    result = {"id": row["id"], "eventId": row["event_id"], "deviceId": row["device_id"],
              "created": _ms(row["created"]), "died": _ms(row["died"]),
              "attempts": row["attempts"], "lastStatus": row["last_status"],
              "reason": redact(row["reason"] or "", webhook),
              "response": redact(row["response"], webhook, True) if row["response"] else None}
    if "event" in row:
        event = row["event"]
        if isinstance(event, bytes):  # stored as the bytes of its JSON
            event = event.decode("utf-8", "replace")
        result["event"] = redact(event, webhook)
    return result


def _ms(ts: float | None) -> int | None:
    return round(ts * 1000) if ts is not None else None


def _ids(body: dict[str, Any]) -> list[int] | None:
    ids = body.get("ids")
    if ids is None:
        return None  # every dead letter of the webhook
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise _reject(422, "ids: expected a list of dead-letter ids (numbers)")
    return ids


async def _object(request: web.Request, empty_ok: bool = False) -> dict[str, Any]:
    if empty_ok and not (await request.read()).strip():
        return {}
    from .admin import MAX_DEPTH, Reject, _loads  # the API's reading of untrusted JSON

    try:
        data = await request.json(loads=_loads)
    except ValueError:
        raise _reject(400, "the body is not valid JSON") from None
    except RecursionError:  # what `check` says of a file nested as deep
        raise Reject(422, {"errors": [f"body: nested deeper than {MAX_DEPTH} levels; "
                                      "flatten it"]}) from None
    if not isinstance(data, dict):
        raise _reject(422, "body: expected a JSON object")
    return data


def _reject(status: int, message: str) -> Exception:
    from .admin import Reject

    return Reject(status, {"error": message})


def _static(name: str) -> tuple[bytes, str]:
    data = resources.files("bridge").joinpath("console_static", name).read_bytes()
    return data, TYPES[os.path.splitext(name)[1]]


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
