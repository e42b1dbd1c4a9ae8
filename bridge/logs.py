"""Logging: structlog set up for a terminal or for journald, with secrets redacted.

Owns the log format (``auto`` = readable console on a TTY, JSON lines otherwise), the level,
and redaction: every secret the configuration holds (passwords, tokens, client secrets,
signing secrets) is registered here and replaced by ``***`` in every value of every log
line, wherever it appears (inside an error message, a URL, a header dump).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")
_AUTH_HEADER = re.compile(r"(?i)((?:authorization|x-auth-token)['\"]?\s*[:=]\s*['\"]?)"
                          r"(basic|bearer)?\s*[^'\",}\s]+")


_rotating: dict[str, str] = {}


def register_secrets(values: Iterable[str | None]) -> None:
    """Remember values that must never be logged (shorter than 4 chars are ignored)."""
    new = {v for v in values if v and len(v) >= 4} - _secrets
    if new:
        _secrets.update(new)
        _compile()


def register_rotating(slot: str, value: str) -> None:
    """A secret that replaces its predecessor (an OAuth2 access token): the old one is
    forgotten so years of hourly tokens do not pile up in the pattern."""
    old = _rotating.get(slot)
    if old == value:
        return
    if old is not None:
        _secrets.discard(old)
    _rotating[slot] = value
    register_secrets([value])
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


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
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
    """Every secret value a loaded configuration holds."""
    values: list[str | None] = [config.mqtt.password, config.admin.token]
    for webhook in config.webhooks:
        auth = webhook.auth
        values += [auth.password, auth.token, auth.value, auth.client_secret]
        if webhook.signing is not None:
            values.append(webhook.signing.secret)
        if webhook.proxy:
            from .proxy import proxy_secrets  # imports this module

            values += proxy_secrets(webhook.proxy)
    return values
