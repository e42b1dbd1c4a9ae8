"""Logging: structlog set up for a terminal or for journald, with secrets redacted.

Owns the log format (``auto`` = readable console on a TTY, JSON lines otherwise), the level,
and redaction: every secret the configuration holds (passwords, tokens, client secrets,
signing secrets) is registered here and replaced by ``***`` in every value of every log
line, wherever it appears (inside an error message, a URL, a header dump).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
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
