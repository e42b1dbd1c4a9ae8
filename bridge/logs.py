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
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_heads: re.Pattern[str] | None = None
_longest = 0
_CUT_MIN = 6  # characters of a cut secret that are taken out
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
    global _pattern, _heads, _longest
    ordered = sorted(_secrets, key=len, reverse=True)
    _pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
    # What a secret cut by an excerpt's end starts with (see redact_excerpt).
    heads = {s[:_CUT_MIN] for s in ordered}
    _heads = re.compile("|".join(re.escape(h) for h in heads)) if heads else None
    _longest = len(ordered[0]) if ordered else 0


def redact(text: str) -> str:
    if _pattern is not None:
        text = _pattern.sub("***", text)
    # Plain substring tests first: every response excerpt passes here, and the two
    # patterns cost 25-130 us on a 1 KB body that has neither.
    if "@" in text and "://" in text:
        text = _USERINFO.sub("***@", text)
    lower = text.lower()
    if "authorization" in lower or "x-auth-token" in lower:
        text = _AUTH_HEADER.sub(lambda m: m.group(1) + (m.group(2) + " " if m.group(2)
                                                         else "") + "***", text)
    return text


def redact_excerpt(text: str) -> str:
    """:func:`redact` for a response excerpt, which was cut at a size limit: a secret cut
    in two by that limit leaves its beginning at the very end, and that goes too."""
    text = redact(text)
    # One search of the tail first: the loop below runs only when a secret may start there.
    if _heads is None or not text or not _heads.search(text, max(0, len(text) - _longest)):
        return text
    for secret in _secrets:
        # The longest tail of ``text`` that begins ``secret`` (6 characters or more: a
        # shorter one says little, and would cut ordinary words).
        head = secret[:_CUT_MIN]
        start = text.rfind(head, max(0, len(text) - len(secret)))
        while start >= 0:
            if len(text) - start >= _CUT_MIN and secret.startswith(text[start:]):
                text = text[:start] + "***"
                break
            start = text.rfind(head, max(0, len(text) - len(secret)), start)
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


# sd-daemon(3) priorities: journald reads a leading "<N>" as the line's syslog level.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def journal_stream(stream: Any) -> bool:
    """True when ``stream`` is the journal: systemd sets JOURNAL_STREAM to the
    ``device:inode`` of the socket it connected to stdout/stderr (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _Prefixed:
    """The JSON renderer, with the line's syslog priority in front for journald."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        level = str(event_dict.get("level", name)).lower()
        return f"<{_PRIORITY.get(level, 6)}>" + self.renderer(logger, name, event_dict)


def _exc_text(args: Any) -> str:
    return "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                              args.exc_traceback))


def setup(format: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog for the bridge and route everything else that logs or prints a
    traceback (stdlib logging of libraries such as amqtt, asyncio's exception handler,
    warnings, uncaught exceptions in threads) through the same renderer, so that a
    non-terminal stream gets nothing but JSON lines."""
    stream = stream or sys.stderr
    numeric = getattr(logging, level.upper(), logging.INFO)
    console = format == "console" or (format == "auto" and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=stream.isatty()) if console
                     else structlog.processors.JSONRenderer())
    global _json_active
    _json_active = not console
    if not console and journal_stream(stream):
        renderer = _Prefixed(renderer)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            _redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redactor, renderer]))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries only from WARNING up: amqtt and aiohttp are chatty at INFO.
    root.setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
    threading.excepthook = lambda args: structlog.get_logger("bridge").error(
        "uncaught exception in a thread", thread=getattr(args.thread, "name", None),
        exception=_exc_text(args))


def config_secrets(config: Any) -> list[str | None]:
    """Every secret value a loaded configuration holds, in each form it is sent in."""
    values: list[str | None] = [config.mqtt.password, config.admin.token]
    values += basic_forms(config.mqtt.username, config.mqtt.password)
    values += url_secrets(getattr(config.mqtt, "proxy", None))
    for webhook in config.webhooks:
        values += webhook_secrets(webhook)
    from .signing import stored_secrets  # generated signing secrets, in the state dir

    values += [f for secret in stored_secrets(config.state_dir) for f in signing_forms(secret)]
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
    if getattr(webhook, "proxy", None):
        from .proxy import proxy_secrets  # imports this module

        values += proxy_secrets(webhook.proxy)
    if webhook.signing is not None:
        values += signing_forms(webhook.signing.secret)
    return values


def signing_forms(secret: str | None) -> list[str]:
    """A signing secret as written (``whsec_<base64>``) and its key part alone."""
    if not secret:
        return []
    return [secret, secret[6:]] if secret.startswith("whsec_") else [secret]


_json_active = False


def json_active() -> bool:
    return _json_active


def fatal(message: str) -> None:
    """The one line of a fatal error: a JSON log line once logging is set up for a
    non-terminal (every line the daemon writes is JSON then), else plain text."""
    message = redact(message)
    if _json_active:
        structlog.get_logger("bridge").critical(message)
    else:
        print(f"webhook-bridge: {message}", file=sys.stderr)
