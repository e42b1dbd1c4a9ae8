"""Operator tools (SPEC §6): ``test``, ``secret``, ``listen`` and ``demo``.

Owns what these commands print and their exit codes. ``test`` renders and sends one
sample event outside the queue, ``secret`` shows and rotates signing secrets through
:class:`~bridge.signing.SecretKeeper`, ``listen`` runs the receiver of
:mod:`bridge.receiver`, and ``demo`` is :mod:`bridge.demo`. None of them touches the
queue, so they are safe while the daemon runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

from . import logs, testsend
from .config import Config, SourceConfig, WebhookConfig, default_config_path, load_config
from .delivery import DELIVERED, Outcome
from .events import Event
from .proxy import ProxyChoice
from .receiver import KEY_HEADERS, format_body, listen
from .render import RenderError, Request
from .rules import Rule
from .signing import SecretKeeper, SecretRotationError, SecretStoreError
from .templates import TemplateError, compile_template

EX_OK, EX_FAIL = 0, 1
SAMPLE_DEVICE = "test-device"
SAMPLE_PAYLOAD: dict[str, Any] = {"test": True, "temp": 21.5}
KNOWN_TYPES = ("telemetry", "alarm", "connection", "disconnection", "device.registration",
               "device.first_registration", "device.registration_update",
               "device.deregistration", "device.write", "device.firmware_update",
               "device.created", "device.deleted")
_SECRET_HEADER = re.compile(r"(?i)token|key|secret|passw|auth")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or default_config_path())


def _fail(message: str) -> int:
    print(f"webhook-bridge: {message}", file=sys.stderr, flush=True)
    return EX_FAIL


def _webhook(config: Config, name: str) -> WebhookConfig | None:
    webhook = config.webhook(name)
    if webhook is None:
        known = ", ".join(w.name for w in config.webhooks) or "none"
        _fail(f"no webhook named {name!r} in {config.path} (webhooks: {known})")
    return webhook


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- test -------------------------------------------------------------------------------

def sample_event(config: Config, webhook: WebhookConfig, given: Any = None) -> Event:
    """The event ``test`` sends: shaped to pass the webhook's own selection where it can.

    ``given`` is what ``--event FILE`` held: a full envelope (it has ``type`` and
    ``payload``) whose missing fields are filled in, or a bare payload.
    """
    source = _sample_source(config, webhook)
    payload: Any = dict(SAMPLE_PAYLOAD)
    if webhook.channel is not None:
        payload = {"webhook_channel": webhook.channel, "webhook_payload": {"test": True}}
    labels = _sample_labels(source, webhook)
    event = Event(type=_sample_type(webhook),
                  source=source.name if source else "test",
                  topic=_sample_topic(source, labels), payload=payload,
                  device_id=SAMPLE_DEVICE,
                  labels=labels)
    if isinstance(given, dict) and "type" in given and "payload" in given:
        return Event.from_envelope({**event.envelope(), **given})
    if given is not None:
        event.payload = given
    return event


def _sample_type(webhook: WebhookConfig) -> str:
    """The first type the webhook names, or the first well-known type its globs match."""
    patterns = webhook.events or ("telemetry",)
    literal = [t for t in patterns if not any(c in t for c in "*?[")]
    if literal:
        return literal[0]
    globbed = [t for t in KNOWN_TYPES if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
    return globbed[0] if globbed else "telemetry"


def _sample_source(config: Config, webhook: WebhookConfig) -> SourceConfig | None:
    names = webhook.sources or [s.name for s in config.sources]
    return next((s for s in config.sources if names and s.name == names[0]), None)


def _sample_topic(source: SourceConfig | None, labels: dict[str, str]) -> str:
    if source is None:
        return f"devices/{SAMPLE_DEVICE}/telemetry"
    values = {**labels, "device_id": SAMPLE_DEVICE}
    levels = [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), f"test-{m.group(1)}"), level)
              for level in source.topic.split("/")]
    return "/".join("test" if level in ("+", "#") else level for level in levels)


def _sample_labels(source: SourceConfig | None, webhook: WebhookConfig) -> dict[str, str]:
    labels: dict[str, str] = {}
    if source is not None:
        labels.update((name, f"test-{name}") for name in _PLACEHOLDER.findall(source.topic)
                      if name != "device_id")
        context = {"device_id": SAMPLE_DEVICE, "payload": SAMPLE_PAYLOAD, "labels": labels}
        for name, text in source.labels.items():
            with contextlib.suppress(TemplateError):  # a label the sample cannot fill
                labels[name] = compile_template(text).render(context)
    if webhook.fleets:
        labels["fleet"] = webhook.fleets[0]
    if webhook.tags:
        labels["tag"] = webhook.tags[0]
    return labels


def _read_event_file(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shown_headers(webhook: WebhookConfig, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` fit for a terminal: credentials masked, signatures kept (not secret)."""
    shown: dict[str, str] = {}
    auth_name = webhook.auth.name.lower() if webhook.auth.type == "header" else None
    for name, value in headers.items():
        if name.lower() == "authorization":
            scheme = value.split(" ", 1)[0] if " " in value else ""
            value = f"{scheme} ***".strip()
        elif name.lower() == auth_name or (_SECRET_HEADER.search(name) and
                                           name.lower() not in KEY_HEADERS):
            value = "***"
        shown[name] = logs.redact(value)
    if webhook.auth.type == "oauth2":
        shown["Authorization"] = "Bearer ***"
    return shown


def print_request(webhook: WebhookConfig, request: Request, headers: dict[str, str]) -> None:
    print(f"{request.method} {logs.redact(request.url)}")
    for name, value in shown_headers(webhook, headers).items():
        print(f"{name}: {value}")
    print()
    print(logs.redact(format_body(request.body, headers.get("Content-Type", ""))), flush=True)
    if webhook.auth.type == "oauth2":
        print(f"\n(Authorization: an OAuth2 access token from {webhook.auth.token_url},"
              " fetched when sending)")
    route = proxy_route(webhook, request.url)
    if route:
        print(f"\n({route})", flush=True)


def proxy_route(webhook: WebhookConfig, url: str) -> str:
    """How the request travels, when not directly: the proxy and where it was set."""
    try:
        proxy = ProxyChoice(webhook.proxy).select_url(url)
    except ValueError as error:
        return f"proxy misconfigured: {error}"
    if proxy is None:
        return ""
    how = "CONNECT tunnel" if url.lower().startswith("https:") else "absolute-form request"
    origin = "the webhook's proxy key" if proxy.origin == "proxy" else proxy.origin
    auth = ", with credentials" if proxy.authorization else ""
    return f"through proxy {proxy.authority} ({how}, from {origin}{auth})"


def print_outcome(outcome: Outcome) -> None:
    elapsed = f"{outcome.elapsed * 1000:.0f} ms"
    print()
    if outcome.status is None:
        print(f"no response ({elapsed}): {outcome.cause}")
    else:
        print(f"HTTP {outcome.status} ({elapsed})")
        # An endpoint may echo credentials back (an error page quoting the request).
        for name, value in (outcome.headers or {}).items():
            print(f"{name}: {logs.redact(value)}")
        if outcome.response:
            print()
            print(logs.redact(format_body(outcome.response.encode(),
                                          (outcome.headers or {}).get("Content-Type", ""))))
    cause = f": {outcome.cause}" if outcome.kind != DELIVERED and outcome.cause else ""
    print(f"\nresult: {outcome.kind}{logs.redact(cause)}", flush=True)


def cmd_test(args: argparse.Namespace) -> int:
    """Render one sample event for webhook NAME, print the request, and send it (outside
    the queue) unless ``--dry-run``; exit 0 only on a 2xx answer."""
    config = _load(args)
    webhook = _webhook(config, args.name)
    if webhook is None:
        return EX_FAIL
    logs.register_secrets(logs.config_secrets(config))
    try:
        given = _read_event_file(args.event) if args.event else None
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read the event file {args.event}: {exc}")
    event = sample_event(config, webhook, given)
    if not Rule(webhook).matches(event):
        print(f"note: webhook {webhook.name}'s selection would not match this event "
              f"(type {event.type!r}); sending it anyway\n", file=sys.stderr)
    # The request the API's test sends too (a batching webhook: a one-event batch).
    try:
        prepared = testsend.prepare(webhook, event, SecretKeeper(config.state_dir))
    except RenderError as exc:
        return _fail(f"cannot render the request for webhook {webhook.name}: {exc}")
    except (SecretStoreError, ValueError) as exc:
        return _fail(f"cannot sign the request: {exc}")
    request, headers = prepared.request, prepared.headers
    print_request(webhook, request, headers)
    if args.dry_run:
        print("\n(dry run: nothing was sent)", flush=True)
        return EX_OK
    outcome = asyncio.run(testsend.send(prepared))
    print_outcome(outcome)
    return EX_OK if outcome.kind == DELIVERED else EX_FAIL


# -- secret -----------------------------------------------------------------------------

def cmd_secret(args: argparse.Namespace) -> int:
    """``secret show NAME`` prints the signing secrets (asked for explicitly, so printing
    them is the point); ``secret rotate NAME`` makes a new one, the old valid 24 h."""
    config = _load(args)
    webhook = _webhook(config, args.name)
    if webhook is None:
        return EX_FAIL
    if webhook.signing is None:
        return _fail(f"webhook {webhook.name} does not sign its requests; add "
                     "signing: {scheme: standard-webhooks} (or hmac-sha256) to it")
    keeper = SecretKeeper(config.state_dir)
    try:
        if args.action == "show":
            _show_secret(keeper, webhook)
        else:
            _rotate_secret(keeper, webhook)
    except SecretStoreError as exc:
        return _fail(str(exc))
    return EX_OK


def _show_secret(keeper: SecretKeeper, webhook: WebhookConfig) -> None:
    assert webhook.signing is not None
    info = keeper.show(webhook.name, webhook.signing.secret)
    where = "the config file" if info["source"] == "config" else keeper.path
    header = "webhook-signature" if webhook.signing.scheme == "standard-webhooks" \
        else webhook.signing.header
    print(f"webhook: {webhook.name}")
    print(f"scheme: {webhook.signing.scheme} (header {header})")
    print(f"source: {info['source']} (kept in {where})")
    print(f"current: {info['current']}")
    for previous in info["previous"]:
        print(f"previous: {previous['secret']} (still valid until "
              f"{_iso(previous['expires_at'])})")
    if info["pending"]:
        print(f"pending: {info['pending']} (made by `secret rotate`; put it into"
              " signing.secret or secret_file)")
    print("\nGive the receiver the current secret; `webhook-bridge listen --secret <current>`"
          " checks deliveries with it.", flush=True)


def _rotate_secret(keeper: SecretKeeper, webhook: WebhookConfig) -> None:
    assert webhook.signing is not None
    try:
        new = keeper.rotate(webhook.name, webhook.signing.secret)
    except SecretRotationError as rotation:
        print(f"new secret: {rotation.new_secret}")
        print(f"The secret of webhook {webhook.name} is set in the config file, which"
              " webhook-bridge does not edit: put the new secret into its signing.secret"
              " (or secret_file) and reload the daemon.")
        print(f"Until then requests are signed with the old secret; after the change they"
              f" carry both signatures, and the old one stays valid until"
              f" {_iso(rotation.expires_at)} (24 h from now).", flush=True)
        return
    info = keeper.show(webhook.name, None)
    until = max((p["expires_at"] for p in info["previous"]), default=time.time())
    print(f"new secret: {new}")
    print(f"The daemon signs with it from its next request (it re-reads {keeper.path}).")
    print(f"The old secret stays valid for 24 h (until {_iso(until)}): requests carry both"
          " signatures, so update the receiver before then.", flush=True)


# -- listen ------------------------------------------------------------------------------

def cmd_listen(args: argparse.Namespace) -> int:
    """A local receiver that prints every request and verifies signatures; runs until
    Ctrl-C or SIGTERM. Needs no config file."""
    try:
        asyncio.run(listen(args.host, args.port, args.secret))
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return EX_OK


# -- demo ------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()
