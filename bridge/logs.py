"""Logging: structlog set up for a terminal or for journald, with secrets redacted.

Owns the log format (``auto`` = readable console on a TTY, JSON lines otherwise), the level,
and redaction: every secret the configuration holds (passwords, tokens, client secrets,
signing secrets) is registered here and replaced by ``***`` in every value of every log
line, wherever it appears (inside an error message, a URL, a header dump).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import urllib.parse
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_AUTH_HEADER = re.compile(r"(?i)((?:authorization|x-auth-token)['\"]?\s*[:=]\s*['\"]?)"
                          r"(basic|bearer)?\s*[^'\",}\s]+")


_rotating: dict[str, tuple[str, set[str]]] = {}
# Control characters a terminal acts on (C0 but tab and newline, DEL, C1) and the bidi
# overrides that reorder what is shown: text from devices and endpoints is escaped.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def secret_forms(value: str) -> set[str]:
    """``value`` as it may come back inside a response: as is, JSON-escaped (an endpoint
    that echoes headers as JSON), percent-encoded (an echoed URL or form)."""
    return {value, json.dumps(value, ensure_ascii=False)[1:-1],
            json.dumps(value)[1:-1], urllib.parse.quote(value, safe="")}


def basic_forms(username: str | None, password: str | None) -> list[str]:
    """A Basic credential in both forms: ``user:pass`` and its base64 (the header)."""
    if not password:
        return []
    pair = f"{username or ''}:{password}"
    return [password, pair, base64.b64encode(pair.encode()).decode("ascii")]


def url_secrets(url: str | None) -> list[str]:
    """The credentials of a URL's userinfo (``https://user:pass@host``), in every form
    they are sent in: percent-encoded as written, decoded, and as Basic auth."""
    if not url or "@" not in url:
        return []
    try:
        parts = urllib.parse.urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:
        return []
    if password is None:
        return [username] if username else []
    plain = urllib.parse.unquote(password)
    return [password, f"{username}:{password}",
            *basic_forms(urllib.parse.unquote(username or ""), plain)]


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember values that must never be logged or stored (shorter than 4 chars are
    ignored), with their escaped forms."""
    new = _forms(values) - _secrets
    if new:
        _secrets.update(new)
        _compile()


def _forms(values: Iterable[str | None]) -> set[str]:
    return {f for v in values if v and len(v) >= 4 for f in secret_forms(v) if len(f) >= 4}


def register_rotating(slot: str, value: str) -> None:
    """A secret that replaces its predecessor (an OAuth2 access token): the old one is
    forgotten so years of hourly tokens do not pile up in the pattern."""
    old = _rotating.get(slot)
    if old is not None and old[0] == value:
        return
    forms = _forms([value])
    if old is not None:
        # Forget the old token's forms, unless another registration still needs them.
        kept = {f for other, (_, fs) in _rotating.items() if other != slot for f in fs}
        _secrets.difference_update(old[1] - kept - forms)
    _rotating[slot] = (value, forms)
    _secrets.update(forms)
    _compile()


def _compile() -> None:
    global _pattern
    ordered = sorted(_secrets, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None


def redact(text: str) -> str:
    if _pattern is not None:
        text = _pattern.sub("***", text)
    text = _USERINFO.sub("***@", text)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + (m.group(2) + " " if m.group(2) else "")
                            + "***", text)


def redact_excerpt(text: str) -> str:
    """:func:`redact` for a response excerpt, which was cut at a size limit: a secret cut
    in two by that limit leaves its beginning at the very end, and that goes too."""
    text = redact(text)
    if _pattern is None or not text:
        return text
    for secret in _secrets:
        # The longest tail of ``text`` that begins ``secret`` (4 characters or more).
        start = text.rfind(secret[:4], max(0, len(text) - len(secret)))
        while start >= 0:
            if secret.startswith(text[start:]):
                text = text[:start] + "***"
                break
            start = text.rfind(secret[:4], max(0, len(text) - len(secret)), start)
    return text


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (ESC and the others, but
    newline and tab; CR only before LF) and bidi overrides shown as ``\\u001b`` escapes,
    valid inside a JSON string too."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return printable(redact(value))
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def _redactor(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict


def setup(format: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    numeric = getattr(logging, level.upper(), logging.INFO)
    console = format == "console" or (format == "auto" and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=stream.isatty()) if console
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s: %(message)s", force=True)


def config_secrets(config: Any) -> list[str | None]:
    """Every secret value a loaded configuration holds, in each form it is sent in."""
    values: list[str | None] = [config.mqtt.password, config.admin.token]
    values += basic_forms(config.mqtt.username, config.mqtt.password)
    values += url_secrets(getattr(config.mqtt, "proxy", None))
    for webhook in config.webhooks:
        values += webhook_secrets(webhook)
    return values


def webhook_secrets(webhook: Any) -> list[str | None]:
    """A webhook's secrets: auth (Basic also as ``user:pass`` and base64), OAuth2 client
    secret, URL and proxy userinfo, signing secret (``whsec_`` and its key part)."""
    auth = webhook.auth
    values: list[str | None] = [auth.password, auth.token, auth.value, auth.client_secret]
    if auth.type == "basic":
        values += basic_forms(auth.username, auth.password)
    if auth.type == "oauth2":
        values += basic_forms(auth.client_id, auth.client_secret)
    for url in (webhook.url, auth.token_url, getattr(webhook, "proxy", None)):
        values += url_secrets(url if isinstance(url, str) else None)
    if webhook.signing is not None:
        values += signing_forms(webhook.signing.secret)
    return values


def signing_forms(secret: str | None) -> list[str]:
    """A signing secret as written (``whsec_<base64>``) and its key part alone."""
    if not secret:
        return []
    return [secret, secret[6:]] if secret.startswith("whsec_") else [secret]
