"""Configuration: the typed model of SPEC §2, loaded from YAML and validated.

Owns everything between the operator's YAML file and the frozen dataclasses the rest of
the daemon reads: ``${VAR}`` / ``${VAR:-default}`` substitution, ``*_file`` keys,
``conf.d/*.yaml`` merging, defaults, and errors that name ``file:line:column``, the key
path and the fix. Nothing outside this module parses YAML or applies defaults (its
YAML-with-positions machinery and single-value checks live in :mod:`bridge.config_yaml`).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, TypeVar

import jmespath
import jmespath.exceptions

from bridge.config_yaml import (
    HOST,
    MISSING,
    TOKEN,
    Ctx,
    KeyPath,
    Origin,
    Problems,
    Section,
    check_templates,
    describe,
    did_you_mean,
    listen_problem,
    plain_tree,
    read_yaml,
    topic_problem,
    url_problem,
    whsec_problem,
)
from bridge.proxy import NONE as PROXY_NONE
from bridge.proxy import parse_proxy_url

EX_CONFIG = 78
DEFAULT_CONFIG_PATH = "/etc/webhook-bridge/config.yaml"
DEFAULT_STATE_DIR = "/var/lib/webhook-bridge"

PROTOCOLS = ("5", "3.1.1")
OVERFLOWS = ("drop_oldest", "backpressure")
DURABILITIES = ("power_loss", "process_crash")
ON_DAMAGE = ("fail", "move_aside")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
QOS_LEVELS = (0, 1, 2)
FORMATS = ("json", "text", "binary", "senml", "senml-cbor", "lwm2m-emqx")
METHODS = ("POST", "PUT", "PATCH")
CONTENT_TYPES = ("json", "form", "text")
ENVELOPES = ("event", "payload", "iottly", "zerynth")
SIGNING_SCHEMES = ("standard-webhooks", "hmac-sha256")
AUTH_FIELDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "basic": ("username", "password"),
    "bearer": ("token",),
    "header": ("name", "value"),
    "oauth2": ("token_url", "client_id", "client_secret", "scope"),
}
_AUTH_KEYS = {key for keys in AUTH_FIELDS.values() for key in keys}
_DURATION_FIELDS = {"timeout", "max_wait", "initial", "max", "max_age"}

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour|d|day))?\s*",
                   re.IGNORECASE)
_NAME = re.compile(r"[a-z0-9_-]+")
_T = TypeVar("_T")


class ConfigError(Exception):
    """One or more problems in the configuration; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def client_context(self) -> ssl.SSLContext:
        """A client context: ``ca_file`` is the CA to trust (instead of the system's),
        ``cert_file``/``key_file`` a client certificate (mTLS), ``verify: false`` off."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            # No passphrase prompt on a terminal: an encrypted key is an error.
            context.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _no_passphrase() -> bytes:
    raise ssl.SSLError("the key file is encrypted (a passphrase is not supported); give a"
                       " key without a passphrase")


def tls_problems(tls: TLSConfig) -> dict[str, str]:
    """Load the files of ``tls`` as :meth:`TLSConfig.client_context` will: key ->
    what is wrong (empty when they load), so what ``check`` accepts, ``run`` starts."""
    problems: dict[str, str] = {}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError, ValueError) as error:
            problems["ca_file"] = (f"cannot load CA certificates from '{tls.ca_file}':"
                                   f" {_ssl_reason(error)}; give a PEM file of CA certificates")
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as error:
            problems["cert_file"] = (
                f"cannot load the client certificate '{tls.cert_file}' with key"
                f" '{tls.key_file}': {_ssl_reason(error)}; give a PEM certificate and its"
                " unencrypted private key")
    return problems


def _ssl_reason(error: BaseException) -> str:
    """OpenSSL's reason (``PEM_LIB`` -> ``pem lib``) or the OS error, without codes."""
    text = str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)
    if isinstance(error, ssl.SSLError):
        text = re.sub(r"\[\w+\]\s*|\s*\(_ssl\.c:\d+\)", "", text).lower().replace("_", " ")
        return {"pem lib": "not a PEM file, or the key does not match the certificate",
                "no certificate or crl found": "no certificate in the file"}.get(text, text)
    return text


@dataclass(frozen=True)
class MQTTConfig:
    host: str = "127.0.0.1"
    port: int = 1883  # 8883 when tls is set and no port is given
    client_id: str = field(default_factory=lambda: f"webhook-bridge-{socket.gethostname()}")
    username: str | None = None
    password: str | None = None
    protocol: str = "5"  # "5" | "3.1.1"
    session_expiry: int = 86400  # seconds
    keepalive: int = 30  # seconds
    shared_group: str | None = None
    tls: TLSConfig | None = None
    embedded: bool = False
    max_payload: int = 1024 * 1024  # bytes; larger messages are read past (SPEC §8)


@dataclass(frozen=True)
class DeadLettersConfig:
    """The dead letters' own bound (not part of the queue quota): the oldest go first."""

    max_age: float = 30 * 86400.0  # seconds since a letter died
    max_size: int = 32 * 1024 * 1024  # bytes (event plus response excerpt)


@dataclass(frozen=True)
class StoreConfig:
    path: str = os.path.join(DEFAULT_STATE_DIR, "queue.db")
    max_size: int = 256 * 1024 * 1024  # bytes
    overflow: str = "drop_oldest"  # drop_oldest | backpressure
    durability: str = "power_loss"  # power_loss | process_crash
    on_damage: str = "fail"  # fail | move_aside (see store_check)
    commit_window: float = 1.0  # seconds an enqueue may wait for company (flash wear)
    dead_letters: DeadLettersConfig = field(default_factory=DeadLettersConfig)


@dataclass(frozen=True)
class AdminConfig:
    listen: str | None = "127.0.0.1:9883"  # None disables the admin server
    token: str | None = None  # from token / token_file


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True)
class SourceConfig:
    name: str
    topic: str  # template: {name} captures one level; + and # allowed
    qos: int = 1
    format: str = "json"  # json | text | binary | senml | senml-cbor | lwm2m-emqx
    type: str = "telemetry"  # fixed type or template such as "{payload.event}"
    labels: dict[str, str] = field(default_factory=dict)  # values may be templates
    type_map: dict[str, str] = field(default_factory=dict)  # rendered type -> event type


@dataclass(frozen=True)
class AuthConfig:
    type: str = "none"  # none | basic | bearer | header | oauth2
    username: str | None = None
    password: str | None = None
    token: str | None = None
    name: str = "X-AUTH-TOKEN"  # header auth: header name
    value: str | None = None  # header auth: header value
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    scope: str | None = None


@dataclass(frozen=True)
class SigningConfig:
    scheme: str  # standard-webhooks | hmac-sha256
    secret: str | None = None  # None -> generated and kept in the state dir
    header: str = "Biotz-IoT-Signature"  # hmac-sha256 only


@dataclass(frozen=True)
class BatchConfig:
    max_events: int = 100
    max_wait: float = 2.0  # seconds


@dataclass(frozen=True)
class RetryConfig:
    initial: float = 1.0  # seconds
    max: float = 300.0
    max_age: float = 7 * 86400.0


@dataclass(frozen=True)
class WebhookConfig:
    name: str
    url: str
    description: str = ""
    enabled: bool = True
    sources: tuple[str, ...] | None = None  # None = every source
    events: tuple[str, ...] | None = None  # shell globs; None = every type but "invalid"
    channel: str | None = None
    fleets: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    filter: str | None = None  # JMESPath over the envelope
    method: str = "POST"
    content_type: str = "json"  # json | form | text
    payload_only: bool = False
    envelope: str = "event"  # event | payload | iottly | zerynth
    body: Any = None  # template structure; overrides envelope
    headers: dict[str, str] = field(default_factory=dict)
    auth: AuthConfig = field(default_factory=AuthConfig)
    signing: SigningConfig | None = None
    batch: BatchConfig | None = None
    tls: TLSConfig | None = None
    allow_insecure_http: bool = False
    # None: HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment; "none": direct;
    # else http://[user:pass@]host:port (see bridge.proxy).
    proxy: str | None = None
    timeout: float = 10.0
    concurrency: int = 4
    rate_limit: float | None = None  # requests per second
    ordered: bool = False
    retry: RetryConfig = field(default_factory=RetryConfig)
    failure_limit: int = 10


@dataclass(frozen=True)
class Config:
    path: str
    mqtt: MQTTConfig = field(default_factory=MQTTConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sources: tuple[SourceConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()
    state_dir: str = DEFAULT_STATE_DIR  # where generated secrets and status live

    def webhook(self, name: str) -> WebhookConfig | None:
        return next((w for w in self.webhooks if w.name == name), None)


def default_config_path() -> str:
    return os.environ.get("WEBHOOK_BRIDGE_CONFIG") or DEFAULT_CONFIG_PATH


def parse_duration(text: str | int | float) -> float:
    """``500ms 10s 5m 24h 7d`` (or a bare number of seconds) -> seconds."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a duration such as 500ms, 10s, 5m, 24h or 7d, got"
                         f" {describe(text)}")
    seconds = _duration_text(text) if isinstance(text, str) else float(text)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {text!r}; it must be a finite number >= 0")
    return seconds


def _duration_text(text: str) -> float:
    lowered = text.strip().lower()
    if _NUMBER.fullmatch(lowered):
        return float(lowered)
    if not _DURATION.fullmatch(lowered):
        raise ValueError(f"invalid duration {text!r}; use a number with a unit: 500ms, 10s,"
                         " 5m, 24h, 7d")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(lowered))


def format_duration(seconds: float) -> str | float:
    """The shortest ``10s``/``5m``/``7d``/``500ms`` text for ``seconds`` (a number if none)."""
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count.is_integer():
            text = f"{int(count)}{unit}"
            if parse_duration(text) == seconds:
                return text
    return seconds


def parse_size(text: str | int) -> int:
    """``64KB 256MB 1GB`` (or a bare number of bytes) -> bytes."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a size such as 64KB, 256MB or 1GB, got {describe(text)}")
    if isinstance(text, str):
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid size {text!r}; use a number with a unit: 512B, 64KB,"
                             " 256MB, 1GB")
        unit = (match.group(2) or "b")[0].lower()
        size = float(match.group(1)) * _SIZE_UNITS[unit]
    else:
        size = float(text)
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"invalid size {text!r}; it must be a number of bytes >= 0")
    if size >= 2**62:  # SQLite's integers end at 2**63
        raise ValueError(f"invalid size {text!r}; it must be less than 4 EiB")
    return int(size)


def parse_rate(text: str | int | float) -> float:
    """``20/s 100/m 5/h`` (or a bare number per second) -> requests per second."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"expected a rate such as 20/s, got {describe(text)}")
    if isinstance(text, str):
        match = _RATE.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid rate {text!r}; use requests per time unit: 20/s, 100/m,"
                             " 5/h (or a number per second)")
        rate = float(match.group(1)) / _DURATION_UNITS[(match.group(2) or "s")[0].lower()]
    else:
        rate = float(text)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"invalid rate {text!r}; it must be more than 0 (null = unlimited)")
    return rate


def _build(cls: type[_T], **fields: Any) -> _T:
    return cls(**{k: v for k, v in fields.items() if v is not MISSING})


def _where_key(sec: Section, key: str) -> str:
    return f"{key}_file" if f"{key}_file" in sec.data else key


def _name(sec: Section, kind: str) -> Any:
    name = sec.text("name", required=True, file_ok=False)
    if isinstance(name, str) and not _NAME.fullmatch(name):
        sec.problem("name", f"invalid {kind} name {name!r}; use only lowercase letters, digits,"
                    " '_' and '-'")
        return MISSING
    return name


def _template(sec: Section, key: str) -> Any:
    value = sec.text(key)
    if isinstance(value, str):
        check_templates(sec.ctx, (*sec.path, key), value)
    return value


def _tls(sec: Section, key: str) -> Any:
    value = sec.data.get(key)
    if isinstance(value, bool):
        sec.raw(key)
        return TLSConfig() if value else None
    tls = sec.section(key)
    if tls is None:
        return MISSING
    paths = {k: tls.path_value(k, must_exist=True) for k in ("ca_file", "cert_file", "key_file")}
    if ("cert_file" in tls.data) != ("key_file" in tls.data):
        given = "cert_file" if "cert_file" in tls.data else "key_file"
        tls.problem(given, "cert_file and key_file go together (client certificate); give both"
                    " or neither")
    verify = tls.boolean("verify")
    tls.finish()
    config = _build(TLSConfig, verify=verify, **paths)
    unusable = any(k in tls.data and v is MISSING for k, v in paths.items())
    if not unusable and (config.cert_file is None) == (config.key_file is None):
        for key, problem in tls_problems(config).items():
            tls.problem(key, problem)
    return config


def _seconds(value: Any) -> int:
    return round(parse_duration(value))


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than 0, got {value!r}")
    return seconds


def _parse_mqtt(sec: Section) -> MQTTConfig:
    tls = _tls(sec, "tls")
    port = sec.integer("port", minimum=1, maximum=65535)
    shared = sec.text("shared_group", nullable=True)
    if isinstance(shared, str) and (not shared or any(c in shared for c in "/+#")):
        sec.problem("shared_group", f"invalid group {shared!r}; use a name without '/', '+', '#'")
    host = _nonempty(sec, "host")
    if isinstance(host, str) and host and not HOST.fullmatch(host.strip("[]")):
        sec.problem("host", f"invalid host {describe(host)}; give a host name or an IP address")
        host = MISSING
    config = _build(
        MQTTConfig,
        host=host,
        port=8883 if port is MISSING and tls not in (MISSING, None) else port,
        client_id=_nonempty(sec, "client_id"),
        username=sec.text("username", nullable=True),
        password=sec.text("password", nullable=True),
        protocol=sec.choice("protocol", PROTOCOLS),
        # MQTT sends these as 32- and 16-bit numbers.
        session_expiry=sec.parsed("session_expiry", _seconds, minimum=0, maximum=2**32 - 1),
        keepalive=sec.parsed("keepalive", _seconds, minimum=0, maximum=65535),
        shared_group=shared,
        tls=tls,
        embedded=sec.boolean("embedded"),
        max_payload=sec.parsed("max_payload", parse_size, minimum=1,
                               maximum=268_435_455),  # the largest MQTT packet
    )
    sec.finish()
    return config


def _nonempty(sec: Section, key: str) -> Any:
    value = sec.text(key)
    if value == "":
        sec.problem(key, "must not be empty; give a value or remove the key for the default")
        return MISSING
    return value


def _parse_store(sec: Section) -> StoreConfig:
    path = sec.path_value("path")
    config = _build(
        StoreConfig,
        path=path if isinstance(path, str) else _default_store_path(),
        max_size=sec.parsed("max_size", parse_size, minimum=1),
        overflow=sec.choice("overflow", OVERFLOWS),
        durability=sec.choice("durability", DURABILITIES),
        on_damage=sec.choice("on_damage", ON_DAMAGE),
        commit_window=sec.parsed("commit_window", parse_duration, minimum=0),
        dead_letters=_dead_letters(sec.section("dead_letters")),
    )
    sec.finish()
    return config


def _dead_letters(sec: Section | None) -> Any:
    if sec is None:
        return MISSING
    config = _build(DeadLettersConfig,
                    max_age=sec.parsed("max_age", _positive_duration),
                    max_size=sec.parsed("max_size", parse_size, minimum=1))
    sec.finish()
    return config


def _default_store_path() -> str:
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state or DEFAULT_STATE_DIR, "queue.db")


def _parse_admin(sec: Section) -> AdminConfig:
    listen = sec.text("listen", nullable=True)
    if isinstance(listen, str) and (problem := listen_problem(listen)):
        sec.problem("listen", problem)
        listen = MISSING
    config = _build(AdminConfig, listen=listen, token=sec.text("token", nullable=True))
    sec.finish()
    return config


def _parse_log(sec: Section) -> LogConfig:
    config = _build(LogConfig, format=sec.choice("format", LOG_FORMATS),
                    level=sec.choice("level", LOG_LEVELS))
    sec.finish()
    return config


def _parse_source(sec: Section) -> SourceConfig | None:
    name = _name(sec, "source")
    topic = sec.text("topic", required=True, file_ok=False)
    if isinstance(topic, str) and (problem := topic_problem(topic)):
        sec.problem("topic", problem)
        topic = MISSING
    labels = sec.string_map("labels")
    if isinstance(labels, dict):
        check_templates(sec.ctx, (*sec.path, "labels"), labels)
    fmt = sec.choice("format", FORMATS)
    fields = {"qos": sec.choice("qos", QOS_LEVELS), "format": fmt,
              "type": _template(sec, "type"), "labels": labels,
              "type_map": _type_map(sec, fmt)}
    sec.finish()
    if name is MISSING or topic is MISSING:
        return None
    return _build(SourceConfig, name=name, topic=topic, **fields)


def _type_map(sec: Section, fmt: Any) -> Any:
    """``type_map``: rendered ``type`` -> event type, both non-empty text. Not for
    ``lwm2m-emqx`` sources, whose types come from the messages (and drive the registry)."""
    mapping = sec.string_map("type_map")
    if not isinstance(mapping, dict):
        return mapping
    if fmt == "lwm2m-emqx":
        sec.problem("type_map", "does not apply to format lwm2m-emqx (its event types come"
                    " from the LwM2M messages); remove it", at_key=True)
        return MISSING
    result: dict[str, str] = {}
    for name, value in mapping.items():
        path = (*sec.path, "type_map", name)
        if not name:
            sec.ctx.problem(path, "an empty type cannot be mapped; remove the entry", key=True)
        elif not value.strip():
            sec.ctx.problem(path, f"maps {name!r} to an empty event type; give a type such as"
                            " connection")
        else:
            result[name] = value
    return result


def _parse_webhook(sec: Section) -> WebhookConfig | None:
    name = _name(sec, "webhook")
    insecure = sec.boolean("allow_insecure_http")
    url = sec.text("url", required=True)
    if isinstance(url, str) and (problem := url_problem(url, insecure=insecure is True)):
        sec.problem(_where_key(sec, "url"), problem)
        url = MISSING
    fields = {**_match_fields(sec), **_request_fields(sec, insecure is True),
              **_policy_fields(sec)}
    sec.finish()
    if name is MISSING or url is MISSING:
        return None
    return _build(WebhookConfig, name=name, url=url, allow_insecure_http=insecure, **fields)


def _match_fields(sec: Section) -> dict[str, Any]:
    return {
        "description": sec.text("description"),
        "enabled": sec.boolean("enabled"),
        "sources": sec.strings("sources"),
        "events": sec.strings("events"),
        "channel": sec.text("channel", nullable=True),
        "fleets": sec.strings("fleets"),
        "tags": sec.strings("tags"),
        "filter": sec.parsed("filter", _compile_filter, nullable=True),
    }


def _compile_filter(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a JMESPath expression, got {describe(value)}; quote it")
    try:
        jmespath.compile(value)
    except RecursionError:  # the parser recurses once per parenthesis
        raise ValueError("invalid JMESPath expression: nested too deeply; simplify it") from None
    except jmespath.exceptions.JMESPathError as error:
        detail = getattr(error, "message", None) or getattr(error, "msg", None) or str(error)
        if isinstance(error, jmespath.exceptions.IncompleteExpressionError):
            detail = "incomplete expression"
        position = getattr(error, "lex_position", None)
        at = f" at character {position + 1}" if isinstance(position, int) else ""
        raise ValueError(f"invalid JMESPath expression: {detail}{at}; fix the expression"
                         " (literals go in backticks: `30`)") from None
    return value


def _request_fields(sec: Section, insecure: bool) -> dict[str, Any]:
    body = sec.raw("body")
    if body is not MISSING:
        # A string body that is JSON text is rendered on its parsed structure (render.py
        # does the same), so its JSON braces are not placeholders.
        parsed = body
        if isinstance(body, str):
            with contextlib.suppress(json.JSONDecodeError):
                parsed = json.loads(body)
        check_templates(sec.ctx, (*sec.path, "body"), parsed)
    return {
        "method": sec.choice("method", METHODS),
        "content_type": sec.choice("content_type", CONTENT_TYPES),
        "payload_only": sec.boolean("payload_only"),
        "envelope": sec.choice("envelope", ENVELOPES),
        "body": body,
        "headers": _headers(sec),
        "auth": _auth(sec.section("auth"), insecure),
        "signing": _signing(sec.section("signing")),
        "batch": _batch(sec),
        "tls": _tls(sec, "tls"),
        "proxy": sec.parsed("proxy", _proxy_setting, nullable=True),
    }


def _proxy_setting(value: Any) -> str:
    """``none`` or an http:// proxy URL with a host and a port (checked now, so a typo
    is a config error rather than a delivery that never connects)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a proxy URL such as http://proxy.corp:3128 or none, got"
                         f" {describe(value)}")
    if value.strip().lower() == PROXY_NONE:
        return PROXY_NONE
    parse_proxy_url(value)
    return value.strip()


def _headers(sec: Section) -> Any:
    headers = sec.string_map("headers")
    if not isinstance(headers, dict):
        return headers
    for name, value in list(headers.items()):
        path = (*sec.path, "headers", name)
        if not TOKEN.fullmatch(name):
            sec.ctx.problem(path, f"invalid header name {name!r}; use letters, digits and"
                            " '-' only", key=True)
            del headers[name]
        elif any(c in value for c in "\r\n\0"):
            sec.ctx.problem(path, "header values must not contain CR, LF or NUL (header"
                            " injection); put the value on one line")
            del headers[name]
    return headers


def _auth(sec: Section | None, insecure: bool) -> Any:
    if sec is None:
        return MISSING
    if "type" not in sec.data and sec.data:
        sec.problem(None, f"missing required key 'type'; use one of: {', '.join(AUTH_FIELDS)}")
        sec.known.update(sec.data)
        return MISSING
    kind = sec.choice("type", AUTH_FIELDS)
    if kind is MISSING:
        sec.known.update(_AUTH_KEYS | {f"{k}_file" for k in _AUTH_KEYS})
        return MISSING
    wanted = AUTH_FIELDS[kind]
    sec.only(sorted(_AUTH_KEYS - set(wanted)), f"does not apply to auth type '{kind}'"
             f" (it takes: {', '.join(wanted) or 'nothing'})")
    fields = {k: sec.text(k, required=k not in ("name", "scope")) for k in wanted}
    _check_auth_values(sec, fields, insecure)
    sec.finish()
    return _build(AuthConfig, type=kind, **fields)


def _check_auth_values(sec: Section, fields: dict[str, Any], insecure: bool) -> None:
    token_url = fields.get("token_url")
    if isinstance(token_url, str):
        problem = url_problem(token_url, insecure=insecure, templates=False)
        if problem:
            sec.problem(_where_key(sec, "token_url"), problem)
    name = fields.get("name")
    if isinstance(name, str) and not TOKEN.fullmatch(name):
        sec.problem("name", f"invalid header name {name!r}; use letters, digits and '-' only")


def _signing(sec: Section | None) -> Any:
    if sec is None:
        return MISSING
    scheme = sec.choice("scheme", SIGNING_SCHEMES)
    if "scheme" not in sec.data:
        sec.problem(None, "missing required key 'scheme'; use one of:"
                    f" {', '.join(SIGNING_SCHEMES)}")
    secret = sec.text("secret", nullable=True)
    header: Any = MISSING
    if scheme == "standard-webhooks":
        sec.only(["header"], "applies only to scheme hmac-sha256")
        if isinstance(secret, str) and (problem := whsec_problem(secret)):
            sec.problem(_where_key(sec, "secret"), problem)
    else:
        header = sec.text("header", file_ok=False)
        if isinstance(header, str) and not TOKEN.fullmatch(header):
            sec.problem("header", f"invalid header name {header!r}; use letters, digits, '-'")
    sec.finish()
    if scheme is MISSING:
        return MISSING
    return _build(SigningConfig, scheme=scheme, secret=secret, header=header)


def _batch(sec: Section) -> Any:
    value = sec.data.get("batch")
    if isinstance(value, bool):
        sec.raw("batch")
        return BatchConfig() if value else None
    batch = sec.section("batch")
    if batch is None:
        return MISSING
    config = _build(BatchConfig, max_events=batch.integer("max_events", minimum=1),
                    max_wait=batch.parsed("max_wait", parse_duration))
    batch.finish()
    return config


def _policy_fields(sec: Section) -> dict[str, Any]:
    return {
        "timeout": sec.parsed("timeout", _positive_duration),
        "concurrency": sec.integer("concurrency", minimum=1),
        "rate_limit": sec.parsed("rate_limit", parse_rate, nullable=True),
        "ordered": sec.boolean("ordered"),
        "retry": _retry(sec.section("retry")),
        "failure_limit": sec.integer("failure_limit", minimum=0),
    }


def _retry(sec: Section | None) -> Any:
    if sec is None:
        return MISSING
    config = _build(RetryConfig, **{k: sec.parsed(k, _positive_duration)
                                     for k in ("initial", "max", "max_age")})
    if config.initial > config.max:
        key = "initial" if "initial" in sec.data else "max"
        sec.problem(key, f"initial ({format_duration(config.initial)}) is longer than max"
                    f" ({format_duration(config.max)}); make initial <= max")
    sec.finish()
    return config


class _Loader:
    """One load: the main file, then ``conf.d/*.yaml``, then the cross-file checks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base_dir = os.path.dirname(path)
        self.problems = Problems()
        self.sources: dict[str, str] = {}
        self.webhooks: dict[str, str] = {}
        self.source_list: list[SourceConfig | None] = []
        self.webhook_list: list[WebhookConfig | None] = []
        self.refs: list[tuple[Ctx, KeyPath, str]] = []

    def load(self) -> Config:
        top = self._section(self.path)
        parts = {key: parse(Section(top.ctx, (key,), top.raw(key)))
                 for key, parse in _SECTIONS.items()}
        self._lists(top)
        top.finish()
        pattern = os.path.join(glob.escape(self.base_dir), "conf.d", "*.yaml")
        for extra in sorted(glob.glob(pattern)):
            section = self._section(extra)
            self._lists(section)
            section.finish()
        _check_source_refs(self.refs, self.sources)
        return Config(path=self.path, **parts,
                      sources=tuple(s for s in self.source_list if s is not None),
                      webhooks=tuple(w for w in self.webhook_list if w is not None),
                      state_dir=os.path.dirname(parts["store"].path))

    def _section(self, path: str) -> Section:
        origin = Origin(name=path, base_dir=self.base_dir, env=os.environ)
        data = read_yaml(origin, self.problems)
        return Section(Ctx(origin, self.problems), (), {} if data is MISSING else data)

    def _lists(self, top: Section) -> None:
        for path, item in top.items("sources", "sources"):
            section = Section(top.ctx, path, item)
            unique = self._unique(self.sources, section, "source")
            source = _parse_source(section)
            if unique:
                self.source_list.append(source)
        for path, item in top.items("webhooks", "webhooks"):
            section = Section(top.ctx, path, item)
            unique = self._unique(self.webhooks, section, "webhook")
            webhook = _parse_webhook(section)
            self.refs.extend(_source_refs(section))
            if unique:
                self.webhook_list.append(webhook)

    def _unique(self, seen: dict[str, str], sec: Section, kind: str) -> bool:
        name = sec.data.get("name")
        if not isinstance(name, str):
            return True
        where = sec.ctx.origin.where((*sec.path, "name"))
        if name in seen:
            sec.problem("name", f"duplicate {kind} name {name!r} (also defined at {seen[name]});"
                        " rename one of them")
            return False
        seen[name] = where
        return True


def _source_refs(sec: Section) -> list[tuple[Ctx, KeyPath, str]]:
    value = sec.data.get("sources")
    if isinstance(value, str):
        return [(sec.ctx, (*sec.path, "sources"), value)]
    if not isinstance(value, list):
        return []
    return [(sec.ctx, (*sec.path, "sources", i), name)
            for i, name in enumerate(value) if isinstance(name, str)]


def _check_source_refs(refs: list[tuple[Ctx, KeyPath, str]], known: Iterable[str]) -> None:
    names = set(known)
    for ctx, path, name in refs:
        if name not in names:
            hint = did_you_mean(name, names) or ("; no sources are defined" if not names else
                                                 f"; known sources: {', '.join(sorted(names))}")
            ctx.problem(path, f"unknown source {name!r}{hint}")


_SECTIONS: dict[str, Callable[[Section], Any]] = {
    "mqtt": _parse_mqtt, "store": _parse_store, "admin": _parse_admin, "log": _parse_log,
}


def load_config(path: str) -> Config:
    """Load, substitute, merge ``conf.d/*.yaml``, validate; raise :class:`ConfigError`.

    Relative paths (``store.path``, tls files, ``*_file``) are resolved against the main
    file's directory, also in conf.d files. conf.d files may hold only ``sources`` and
    ``webhooks``, appended in file-name order.
    """
    loader = _Loader(os.path.abspath(path))
    config = loader.load()
    if loader.problems:
        raise ConfigError(loader.problems.lines())
    return config


def webhook_from_mapping(data: dict[str, Any], origin: str, *,
                         sources: Iterable[str] | None = None, base_dir: str | None = None,
                         trusted: bool = False) -> WebhookConfig:
    """Validate one webhook mapping (REST API body) exactly like the loader does.

    ``origin`` prefixes every problem. ``sources`` (when given) are the names webhook
    ``sources`` may refer to. Untrusted data (the default) may not use ``${VAR}`` or
    ``*_file`` keys; ``$${`` is still read as a literal ``${`` so that the output of
    :func:`dump_webhook` reads back unchanged.
    """
    where = Origin(name=origin, base_dir=base_dir or os.getcwd(),
                   env=os.environ if trusted else None, allow_files=trusted)
    problems = Problems()
    section = Section(Ctx(where, problems), (), plain_tree(data, where, problems))
    webhook = _parse_webhook(section)
    if sources is not None:
        _check_source_refs(_source_refs(section), sources)
    if problems or webhook is None:
        raise ConfigError(problems.lines() or [f"{origin}: invalid webhook"])
    return webhook


def dump_webhook(w: WebhookConfig, *, escape: bool = True) -> dict[str, Any]:
    """The mapping of ``w`` as written in YAML: name, url and every non-default field.

    Secrets are included (conf.d files are written from this). With ``escape`` every
    ``${`` becomes ``$${`` so loading the written file gives back ``w`` unchanged.
    """
    data: dict[str, Any] = {"name": w.name, "url": w.url}
    default = WebhookConfig(name=w.name, url=w.url)
    for item in dataclass_fields(WebhookConfig):
        value = getattr(w, item.name)
        if item.name not in data and value != getattr(default, item.name):
            data[item.name] = _dump_value(item.name, value)
    return _escape(data) if escape else data


def _dump_value(name: str, value: Any) -> Any:
    if name in _DURATION_FIELDS:
        return format_duration(value)
    if name == "rate_limit" and value is not None and float(value).is_integer():
        return f"{int(value)}/s"
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, (AuthConfig, SigningConfig, BatchConfig, TLSConfig, RetryConfig)):
        return _dump_nested(value)
    return copy.deepcopy(value)


def _dump_nested(value: Any) -> dict[str, Any]:
    kept = {"type", "scheme"}
    data: dict[str, Any] = {}
    for item in dataclass_fields(value):
        current = getattr(value, item.name)
        if item.name in kept or current != item.default:
            data[item.name] = _dump_value(item.name, current)
    return data


def _escape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value.replace("${", "$${") if isinstance(value, str) else value
