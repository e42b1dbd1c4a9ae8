"""Proxies: which HTTP proxy (if any) a webhook request goes through.

Owns the ``proxy`` setting of a webhook (a URL, ``none``, or unset = the environment),
parsing a proxy URL (``http://user:pass@host:port``; the credentials become a
``Proxy-Authorization: Basic`` value and are registered for redaction), and the
environment rules: ``https_proxy``/``HTTPS_PROXY`` for https URLs, ``http_proxy``/
``HTTP_PROXY`` for http URLs, ``no_proxy``/``NO_PROXY`` for exceptions, the lower-case
name winning when both are set (as curl does). How a request goes through the chosen proxy
(CONNECT, absolute-form) is :mod:`bridge.http1`'s business.

Why not :func:`urllib.request.proxy_bypass_environment`: it has no CIDR ranges, treats
``NO_PROXY`` ports only when the caller passes ``host:port``, and does not say which
variable a proxy came from, which an operator needs in an error message.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from . import logs

NONE = "none"  # the `proxy` keyword for a direct connection whatever the environment says
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where to connect and the Proxy-Authorization value (or None)."""

    host: str
    port: int
    authorization: str | None = None  # "Basic ..."; never shown
    username: str | None = None
    password: str | None = None
    origin: str = "proxy"  # where it was set: "proxy" (the webhook key) or an env variable

    @property
    def authority(self) -> str:
        """``host:port``, for messages (never the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL without credentials (what aiohttp's ``proxy=`` takes)."""
        return f"http://{self.authority}"


def parse_proxy_url(text: str, origin: str = "proxy", *, require_port: bool = True) -> Proxy:
    """A :class:`Proxy` from ``http://[user[:password]@]host:port[/]``; ValueError says
    what is wrong and how to fix it. Environment values may omit the scheme and the port
    (``proxy.corp:3128``, as curl accepts; the port then defaults to 80)."""
    text = text.strip()
    if "://" not in text and not require_port:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"invalid proxy URL ({error}); write http://host:port") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError("https:// proxies (TLS to the proxy) are not supported; use the"
                         " proxy's http:// address (https requests still go through it"
                         " encrypted, with CONNECT)")
    if scheme != "http":
        raise ValueError(f"unsupported proxy scheme {scheme + '://' if scheme else '(none)'};"
                         " write http://host:port")
    host = parts.hostname
    if not host:
        raise ValueError("the proxy URL has no host; write http://host:port")
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path or query; write http://host:port")
    if port is None:
        if require_port:
            raise ValueError("the proxy URL has no port; write http://host:port, e.g."
                             " http://proxy.corp:3128")
        port = 80
    authorization = username = password = None
    if parts.username is not None:
        username = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(
            f"{username}:{password}".encode()).decode("ascii")
        # The raw (still encoded) password may appear in a URL someone logs. Without a
        # password the user name is the credential (a token as user name).
        logs.register_secrets([password, parts.password, authorization[6:]] if password
                              else [username, parts.username, authorization[6:]])
    return Proxy(host, port, authorization, username, password, origin)


def proxy_secrets(setting: str | None) -> list[str | None]:
    """The secret parts of a ``proxy`` setting (for :func:`bridge.logs.config_secrets`)."""
    if not setting or "@" not in setting:
        return []
    try:
        proxy = parse_proxy_url(setting)
    except ValueError:
        return []
    return [proxy.password or proxy.username,
            proxy.authorization and proxy.authorization[6:]]


def redact_proxy_url(text: str) -> str:
    """``text`` with the password replaced by ``***`` (for the API and status output)."""
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _env(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) of ``name`` in lower case, else upper case; empty = unset."""
    for variable in (name.lower(), name.upper()):
        value = environ.get(variable)
        if value is not None and value.strip():
            return variable, value
        if value is not None:
            return None  # set but empty: deliberately off (curl: "" disables)
    return None


def no_proxy_matches(no_proxy: str, host: str, port: int) -> bool:
    """Whether ``NO_PROXY`` (comma or space separated) exempts ``host:port``.

    An entry is ``*`` (everything), a host or domain (``example.com`` matches it and every
    subdomain; a leading ``.`` or ``*.`` means the same), optionally with ``:port`` (then
    only that port), an IP address (``[::1]`` or ``::1`` for IPv6), or a CIDR range
    (``10.0.0.0/8``). Names compare case-insensitively, a trailing dot ignored."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
            ipaddress.ip_address(host))
    except ValueError:
        address = None
    for entry in no_proxy.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6] or [v6]:port
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:  # name:port or v4:port (a bare v6 has several colons)
            name, _, digits = entry.partition(":")
            if not (digits.isascii() and digits.isdigit()):
                continue
            entry, entry_port = name, int(digits)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            if "/" in entry:
                try:
                    if address in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            try:
                if ipaddress.ip_address(entry) == address:
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def from_environment(scheme: str, host: str, port: int,
                     environ: Mapping[str, str]) -> Proxy | None:
    """The proxy the environment gives a request to ``scheme://host:port``, or None."""
    found = _env(environ, f"{scheme}_proxy")
    if found is None:
        return None
    exempt = _env(environ, "no_proxy")
    if exempt is not None and no_proxy_matches(exempt[1], host, port):
        return None
    variable, value = found
    try:
        return parse_proxy_url(value, variable, require_port=False)
    except ValueError as error:
        raise ProxyConfigError(f"{variable} is unusable: {error}") from None


class ProxyConfigError(ValueError):
    """The environment's proxy cannot be used (its text never holds the credentials)."""


class ProxyChoice:
    """A webhook's ``proxy`` setting, resolved per target: ``None`` = the environment (read
    once, when the webhook's sender starts), ``"none"`` = direct, else a proxy URL."""

    __slots__ = ("_environ", "_fixed", "setting")

    def __init__(self, setting: str | None, environ: Mapping[str, str] | None = None) -> None:
        self.setting = setting
        self._fixed: Proxy | None = None
        self._environ: dict[str, str] = {}
        if setting is None:
            source = os.environ if environ is None else environ
            self._environ = {k: v for k, v in source.items() if k.lower() in (
                "http_proxy", "https_proxy", "no_proxy")}
        elif setting.strip().lower() != NONE:
            self._fixed = parse_proxy_url(setting)

    def select(self, scheme: str, host: str, port: int | None = None) -> Proxy | None:
        """The proxy for a request to ``scheme://host:port`` (None: connect directly).
        Raises :class:`ProxyConfigError` when the environment's proxy is unusable."""
        if self._fixed is not None:
            return self._fixed
        if not self._environ:
            return None
        return from_environment(scheme.lower(), host,
                                port or _DEFAULT_PORTS.get(scheme.lower(), 80), self._environ)

    def select_url(self, url: str) -> Proxy | None:
        parts = urllib.parse.urlsplit(url)
        return self.select(parts.scheme, parts.hostname or "", parts.port)
