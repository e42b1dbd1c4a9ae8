"""The local receiver of ``listen`` and ``demo``: prints each delivery and checks its
signature.

Owns signature verification from the receiving side, kept independent of our signing
code where it can be: Standard Webhooks through the reference ``standardwebhooks``
package when it is installed (our own check otherwise), and Biotz-style
``<name>-Signature: t=<ts>,v1=<hex>`` headers from the Biotz text. Answers 200
``{"ok": true}``, or 401 when a signature is present, a secret was given and it does not
verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from .signing import decode_secret, standard_webhooks_signature

KEY_HEADERS = ("content-type", "user-agent", "webhook-id", "webhook-timestamp")


def format_body(body: bytes, content_type: str) -> str:
    """The body for a terminal: JSON pretty-printed, anything else as text."""
    text = body.decode("utf-8", "replace")
    if "json" in content_type:
        with contextlib.suppress(ValueError):
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return text


@dataclass(frozen=True)
class SignatureCheck:
    scheme: str | None  # None: the request carries no signature
    valid: bool | None  # None: not checked (no secret given)
    detail: str = ""

    def describe(self) -> str:
        if self.scheme is None:
            return "none"
        if self.valid is None:
            return f"not checked ({self.scheme}; give --secret to verify)"
        state = "valid" if self.valid else "INVALID"
        return f"{state} ({self.scheme}{': ' + self.detail if self.detail else ''})"


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def verify_standard_webhooks(secret: str, headers: dict[str, str], body: bytes) -> str | None:
    """None if valid, else why not: the reference ``standardwebhooks`` package when it is
    installed (an independent check of our signing code), else our own."""
    try:
        from standardwebhooks.webhooks import Webhook, WebhookVerificationError
    except ImportError:
        return _verify_standard_webhooks_ourselves(secret, headers, body)
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError as exc:
        return str(exc)
    except (ValueError, TypeError) as exc:  # a secret that is not base64, a bad header
        return f"cannot verify: {type(exc).__name__}"
    return None


def _verify_standard_webhooks_ourselves(secret: str, headers: dict[str, str], body: bytes
                                        ) -> str | None:
    low = _lower(headers)
    msg_id, stamp = low.get("webhook-id"), low.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit():
        return "missing webhook-id or webhook-timestamp"
    if abs(time.time() - int(stamp)) > 300:
        return "timestamp more than 5 minutes off"
    try:
        decode_secret(secret)
    except ValueError as exc:
        return str(exc)
    expected = standard_webhooks_signature([secret], msg_id, int(stamp), body)
    given = low.get("webhook-signature", "").split()
    ok = any(hmac.compare_digest(expected, entry) for entry in given)
    return None if ok else "no matching signature found"


def verify_hmac_sha256(secret: str, value: str, body: bytes) -> str | None:
    """Biotz-style ``t=<ts>,v1=<hex>[,v1=...]``: HMAC-SHA256(secret, ts + "." + body)."""
    pairs = [p.strip().partition("=") for p in value.split(",") if p.strip()]
    stamps = [v for k, _, v in pairs if k == "t"]
    signatures = [v for k, _, v in pairs if k == "v1"]
    if len(stamps) != 1 or not signatures:
        return "malformed header; expected t=<unix seconds>,v1=<hex>"
    signed = stamps[0].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    ok = any(hmac.compare_digest(expected, s.lower()) for s in signatures)
    return None if ok else "no matching v1 signature"


def _hmac_header(headers: dict[str, str]) -> tuple[str, str] | None:
    for name, value in headers.items():
        low = name.lower()
        if low.endswith("-signature") and low != "webhook-signature" and "v1=" in value:
            return name, value
    return None


def check_signature(headers: dict[str, str], body: bytes, secret: str | None
                    ) -> SignatureCheck:
    low = _lower(headers)
    if "webhook-signature" in low:
        scheme = "standard-webhooks"
        problem = verify_standard_webhooks(secret, headers, body) if secret else None
    elif (found := _hmac_header(headers)) is not None:
        scheme = f"hmac-sha256 {found[0]}"
        problem = verify_hmac_sha256(secret, found[1], body) if secret else None
    else:
        return SignatureCheck(None, None)
    if secret is None:
        return SignatureCheck(scheme, None)
    return SignatureCheck(scheme, problem is None, problem or "")


class Receiver:
    """The aiohttp handler of ``listen`` (and of ``demo``): prints each request, checks
    its signature, answers 200, or 401 when a signature fails verification."""

    def __init__(self, secret: str | None = None, compact: bool = False,
                 on_delivery: Callable[[int], None] | None = None) -> None:
        self.secret = secret
        self.compact = compact
        self.on_delivery = on_delivery
        self.count = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        check = check_signature(headers, body, self.secret)
        self.count += 1
        show = self._line if self.compact else self._block
        print(show(request, headers, body, check), flush=True)
        if check.valid is False:
            return web.json_response({"ok": False, "error": "bad signature"}, status=401)
        if self.on_delivery is not None:
            self.on_delivery(self.count)
        return web.json_response({"ok": True})

    def _block(self, request: web.Request, headers: dict[str, str], body: bytes,
               check: SignatureCheck) -> str:
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
        lines = [f"--- #{self.count} {stamp}  {request.method} {request.path_qs}"]
        for name, value in headers.items():
            low = name.lower()
            if low in KEY_HEADERS or low.endswith("-signature"):
                lines.append(f"{name}: {value}")
        lines.append(f"signature: {check.describe()}")
        lines.append("")
        lines.append(format_body(body, headers.get("Content-Type", "")))
        return "\n".join(lines) + "\n"

    def _line(self, request: web.Request, headers: dict[str, str], body: bytes,
              check: SignatureCheck) -> str:
        summary = body.decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            value = json.loads(summary)
            if isinstance(value, dict) and "payload" in value:
                summary = f"{value.get('type')} {json.dumps(value['payload'])}"
        stamp = datetime.now().strftime("%H:%M:%S")
        return (f"#{self.count} {stamp} <- {request.method} {request.path_qs}  {summary}  "
                f"[signature {check.describe()}]")


async def serve(receiver: Receiver, host: str, port: int) -> web.AppRunner:
    """Start ``receiver`` on host:port; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(receiver.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def stop_on_signals(stop: asyncio.Event) -> None:
    """Ctrl-C and SIGTERM set ``stop``, so shutdown runs the ``finally`` blocks."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def listen(host: str, port: int, secret: str | None) -> None:
    """``webhook-bridge listen``: serve until Ctrl-C or SIGTERM."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    runner = await serve(Receiver(secret), host, port)
    checks = "verifying signatures with the given secret" if secret else \
        "not verifying signatures (give --secret)"
    print(f"listening on http://{host}:{port}/ (any path and method; {checks});"
          " Ctrl-C stops", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
