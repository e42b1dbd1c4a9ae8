"""A lean HTTP/1.1 keep-alive client for webhook requests.

Owns the wire side of one delivery attempt: a per-webhook pool of keep-alive connections
(at most ``limit``, idle ones reused last-in first-out and closed after 60 s), plain TCP
and TLS (the caller's :class:`ssl.SSLContext`, SNI and hostname check on the URL's host),
serialising the request head, parsing the response (Content-Length, chunked with
trailers, read until close, interim 1xx skipped), keeping only a short excerpt of the
body, and the rules for when a connection may be reused. Through an HTTP proxy (chosen
by :mod:`bridge.proxy`), https goes through a CONNECT tunnel (TLS to the endpoint inside
it, verified against the endpoint's name) and http uses the absolute-form request line;
a kept-alive connection is reused only for the same endpoint through the same proxy.
What the request contains and what the response means is :mod:`bridge.delivery`'s business.

Why it exists: CPU. On the 2-core gateways the bridge targets, aiohttp's client spends
about 132 µs of CPU per webhook request (8 concurrent workers posting ~250 bytes to
``bench/sink.py``), more than half of the 250 µs budget for a whole delivered message;
a bare ``asyncio.Protocol`` client spends about 48 µs. This module stays close to the
bare one: no per-request header multidicts, URL objects, streams, tasks or timers (one
future per request; one coarse deadline timer per pool), a URL parse cached per URL
string, the fixed parts of request heads cached per URL, and the response parsed with
bytes operations in ``data_received`` (a head that arrives whole in one read is taken
straight from it, and an endpoint's repeated heads are parsed once). In that
benchmark it measured 45-51 µs per request on a quiet box, within a few µs of the bare
client in every run (most of what is left is the kernel: send, recv, epoll).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

from .proxy import Proxy, ProxyChoice, ProxyConfigError

EXCERPT = 1024  # body bytes kept for dead letters and `webhook-bridge test`
MAX_HEAD = 64 * 1024  # a response head (or trailer section) larger than this is refused
MAX_LINE = 4096  # a chunk-size line
MAX_DRAIN = 1024 * 1024  # body bytes read past the excerpt to keep a connection; else close
IDLE_TIMEOUT = 60.0  # seconds an idle keep-alive connection is kept
URL_CACHE_SIZE = 256  # URLs differ by device id; bounded so a large fleet cannot grow it
PLAN_CACHE_SIZE = 64
# Response heads parsed, by their exact bytes. An endpoint sends the same head again and
# again (an aiohttp server's changes once a second, with its Date), so most responses
# skip the per-line parse (this runs once per request). Bounded: heads with a request id
# or a cookie never repeat, and at most this many bytes each are kept.
HEAD_MEMO_SIZE = 32
HEAD_MEMO_BYTES = 1024

_DEFAULT_PORTS = {"http": 80, "https": 443}
# "HTTP/1.x NNN", then a space and the reason or nothing. [0-9] is ASCII only: str.isdigit()
# also takes "²" (latin-1 0xB2). \Z, not $: $ also matches before a final "\n".
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] [0-9]{3}(?: |\Z)")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # known tokens


class HTTPClientError(ConnectionError):
    """A request failed below HTTP semantics: the text is safe to log (it never holds a
    request header value)."""


class ConnectError(HTTPClientError):
    """The connection could not be opened (refused, unreachable, DNS)."""


class ProxyError(HTTPClientError):
    """The proxy could not be reached or refused the tunnel; the text names the proxy by
    ``host:port`` only. ``config_problem``: the proxy answered with a 4xx (credentials,
    policy), which waiting will not fix."""

    def __init__(self, message: str, config_problem: bool = False) -> None:
        super().__init__(message)
        self.config_problem = config_problem


class ProxyAuthError(ProxyError):
    """The proxy answered 407: its credentials are missing or wrong."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__(f"proxy authentication required (407) at {proxy.authority}"
                         + ("" if proxy.authorization else
                            "; put user:password in the proxy URL"), config_problem=True)


class ConnectionClosed(HTTPClientError):
    """The server closed the connection before the response was complete.

    ``before_response`` says no byte of the response had arrived: on a reused keep-alive
    connection that means the server closed it while it was idle, and the request is
    safe to send again at once on a fresh connection."""

    def __init__(self, message: str, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response


class ProtocolError(HTTPClientError):
    """The server's bytes are not a valid HTTP/1.x response."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"invalid HTTP response: {detail}")


class Headers(dict[str, str]):
    """Response headers: iterating shows the names as the server wrote them (for
    display); ``get``, ``[]`` and ``in`` ignore case, as HTTP header names do.
    Repeated headers are joined with ``", "``."""

    __slots__ = ("lower",)

    def __init__(self) -> None:
        # dict.__new__ made the (empty) mapping already; only the index is ours.
        self.lower: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        previous = self.lower.get(key)
        if previous is None:
            self.lower[key] = value
            dict.__setitem__(self, name, value)
            return
        joined = self.lower[key] = f"{previous}, {value}"
        shown = next(n for n in dict.keys(self) if n.lower() == key)
        dict.__setitem__(self, shown, joined)

    def clone(self) -> Headers:
        """An independent copy (``dict.copy`` would lose the case-insensitive index)."""
        clone = Headers()
        dict.update(clone, self)
        clone.lower.update(self.lower)
        return clone

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self.lower.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self.lower[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.lower


class Response:
    """A complete response: status, headers and the first :data:`EXCERPT` body bytes
    (as received, still content-encoded; :meth:`text` decodes)."""

    __slots__ = ("body", "headers", "interim", "keep_alive", "reason", "status",
                 "trailers", "version")

    def __init__(self, status: int, reason: str, version: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.body = b""
        self.trailers: Headers | None = None
        self.keep_alive = False
        self.interim = 0  # 1xx responses skipped before this one

    def text(self) -> str:
        """The excerpt, content-decoded best-effort, as text (invalid UTF-8 replaced)."""
        encoding = self.headers.lower.get("content-encoding")
        if encoding is None:  # the common case: no second call (this runs per request)
            return self.body.decode("utf-8", "replace")
        return decode_excerpt(self.body, encoding)


def decode_excerpt(body: bytes, encoding: str | None) -> str:
    """``body`` with a gzip/deflate Content-Encoding undone as far as the (possibly
    truncated) bytes allow, at most :data:`EXCERPT` decoded bytes. On any decoding error
    the raw bytes are shown instead: the excerpt is for people reading an error."""
    if body and encoding:
        coding = encoding.strip().lower()
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                 "deflate": zlib.MAX_WBITS}.get(coding)
        if wbits is not None:
            attempts = (wbits, -zlib.MAX_WBITS) if coding == "deflate" else (wbits,)
            for bits in attempts:  # "deflate" is zlib-wrapped, or raw from some servers
                try:
                    decoded = zlib.decompressobj(bits).decompress(body, EXCERPT)
                except zlib.error:
                    continue
                return decoded.decode("utf-8", "replace")
    return body.decode("utf-8", "replace")


# A request head's fixed parts (ConnectionPool._head_parts): request line and Host, the
# lines after the fields but before Content-Length, the caller's names to leave out,
# the number of field lines, and the Content-Type line for a non-empty body (or "").
_HeadParts = tuple[str, str, frozenset[str], int, str]

_HEADS: dict[bytes, _ParsedHead] = {}  # see HEAD_MEMO_SIZE

# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Incremental parser of one HTTP/1.x response; :meth:`feed` takes bytes as they
    arrive, in pieces of any size, and says when the response is complete."""

    __slots__ = ("_body", "_buf", "_drained", "_give_up_at", "_remaining", "_scan", "_state",
                 "got_bytes", "head_only", "leftover", "response")

    def __init__(self, head_only: bool = False) -> None:
        self.head_only = head_only  # a HEAD request: the response has no body
        self.got_bytes = False
        self.leftover = False  # bytes after the end of the response: not reusable
        self.response: Response | None = None
        self._state = _HEAD
        # Unconsumed bytes while a head or line is incomplete (a bytearray then; the
        # shared b"" until needed, which is the common case).
        self._buf: bytes | bytearray = b""
        self._scan = 0  # where (relative to the unconsumed start) to resume searching
        self._remaining = 0
        self._body = b""  # the excerpt so far
        self._drained = 0
        self._give_up_at = EXCERPT + MAX_DRAIN

    def feed(self, data: bytes) -> bool:
        """Consume ``data``; True once the response is complete (bytes after its end
        set :attr:`leftover`). Raises :class:`ProtocolError` on malformed input."""
        if self._state == _DONE:
            if data:
                self.leftover = True
            return True
        if not data:
            return False
        self.got_bytes = True
        buf = self._buf
        pos = 0
        size = len(data)
        state = self._state
        if buf:
            buf += data  # a bytearray: extended in place
            data = buf
            size = len(data)
        elif state == _HEAD:
            # The common case, once per request: the whole head (usually the whole
            # response) in one read. Parsed straight from ``data``; a small body that
            # ends exactly where ``data`` does is the response, with no loop below.
            # Anything else (no end of head yet, a 1xx, chunked, a large or split body,
            # bytes after the end) goes on through the general loop from ``pos``.
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= MAX_HEAD:
                state = self._head(data[:end])
                pos = end + 4
                if state == _LENGTH and size - pos == self._remaining <= EXCERPT:
                    self._drained = self._remaining
                    self._remaining = 0
                    self._body = data[pos:]
                    state = self._finish()
                    pos = size
                if state == _DONE:  # the loop below does not expect to start done
                    self._state = state
                    if pos < size:
                        self.leftover = True
                    return True
        while pos < size:
            if state == _LENGTH:
                n = min(self._remaining, size - pos)
                self._take(data, pos, n)
                pos += n
                self._remaining -= n
                if self._remaining == 0 or len(self._body) >= self._give_up_at:
                    state = self._finish()
                    break
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n", pos + self._scan)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        raise ProtocolError("response head larger than 64 KB")
                    self._scan = max(size - pos - 3, 0)
                    break
                if end - pos > MAX_HEAD:
                    raise ProtocolError("response head larger than 64 KB")
                self._scan = 0
                state = self._head(bytes(data[pos:end]))
                pos = end + 4
                if state == _DONE:
                    break
            elif state == _CHUNK_DATA:
                n = min(self._remaining, size - pos)
                self._take(data, pos, n)
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    state = _CHUNK_END
                if self._drained >= self._give_up_at:
                    state = self._finish(keep_alive=False)
                    break
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos + self._scan)
                if end < 0:
                    if size - pos > MAX_LINE:
                        raise ProtocolError("chunk size line too long")
                    self._scan = max(size - pos - 1, 0)
                    break
                self._scan = 0
                n = _chunk_size(bytes(data[pos:end]))
                pos = end + 2
                if n:
                    self._remaining = n
                    state = _CHUNK_DATA
                else:
                    state = _TRAILERS
            elif state == _CHUNK_END:
                if size - pos < 2:
                    if data[pos:pos + 1] != b"\r":
                        raise ProtocolError("chunk data not followed by CRLF")
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _TRAILERS:
                if size - pos < 2:
                    break
                if data[pos:pos + 2] == b"\r\n":
                    pos += 2
                    state = self._finish()
                    break
                end = data.find(b"\r\n\r\n", pos + self._scan)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        raise ProtocolError("trailer section larger than 64 KB")
                    self._scan = max(size - pos - 3, 0)
                    break
                self._scan = 0
                assert self.response is not None
                self.response.trailers = _parse_fields(
                    bytes(data[pos:end]).decode("latin-1").split("\r\n"))
                pos = end + 4
                state = self._finish()
                break
            else:  # _UNTIL_CLOSE: the connection is not reused, so stop at the excerpt
                n = size - pos
                self._take(data, pos, n)
                pos = size
                if len(self._body) >= EXCERPT:
                    state = self._finish(keep_alive=False)
                    break
        self._state = state
        if state == _DONE:
            if pos < size:
                self.leftover = True
            self._buf = b""
            return True
        if data is buf:
            if pos:
                del buf[:pos]
        elif pos < size:
            self._buf = bytearray(data[pos:])
        return False

    def feed_eof(self) -> bool:
        """The server closed its side: True when that ends the response (read until
        close), else raises :class:`ConnectionClosed`."""
        if self._state == _DONE:
            return True
        if self._state == _UNTIL_CLOSE:
            self._state = self._finish(keep_alive=False)
            return True
        if not self.got_bytes:
            raise ConnectionClosed("the server closed the connection without answering",
                                   before_response=True)
        raise ConnectionClosed("the server closed the connection in the middle of the "
                               "response")

    def _take(self, data: bytes | bytearray, pos: int, n: int) -> None:
        # Only the excerpt is copied; the rest of a body is counted and dropped.
        kept = len(self._body)
        if kept < EXCERPT and n:
            self._body += data[pos:pos + min(n, EXCERPT - kept)]
        self._drained += n

    def _finish(self, keep_alive: bool = True) -> int:
        response = self.response
        assert response is not None
        if not keep_alive:
            response.keep_alive = False
        response.body = self._body
        return _DONE

    def _head(self, head: bytes) -> int:
        """Take a response head (status line and header fields); the state that comes
        next."""
        parsed = _HEADS.get(head) or _parse_head(head)
        status = parsed.status
        headers = parsed.headers.clone()  # the memo's copy stays as parsed
        if status < 200:
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            # Interim (100 Continue, 103 Early Hints): the real response follows.
            interim = self.response.interim + 1 if self.response is not None else 1
            self.response = Response(status, "", "", headers)
            self.response.interim = interim
            return _HEAD
        response = Response(status, parsed.reason, parsed.version, headers)
        if self.response is not None:
            response.interim = self.response.interim
        self.response = response
        if self.head_only or status in (204, 304):
            response.keep_alive = parsed.keep_alive
            return self._finish()
        state, response.keep_alive, self._remaining, self._give_up_at = (
            parsed.framing or parsed.frame())
        if state == _DONE:
            return self._finish()
        return state


class _ParsedHead:
    """A response head as parsed (and memoised by its bytes): what it says, and, worked
    out on first use, how a body follows it (for any request but HEAD)."""

    __slots__ = ("framing", "headers", "keep_alive", "reason", "status", "version")

    def __init__(self, status: int, reason: str, version: str, headers: Headers) -> None:
        self.status = status
        self.reason = reason
        self.version = version  # "1.1"
        self.headers = headers
        connection = headers.lower.get("connection")
        tokens = {t.strip() for t in connection.lower().split(",")} if connection else ()
        if version == "1.0":
            self.keep_alive = "keep-alive" in tokens
        else:
            self.keep_alive = "close" not in tokens
        self.framing: tuple[int, bool, int, int] | None = None

    def frame(self) -> tuple[int, bool, int, int]:
        """The parser's state after the head, whether the connection may be reused, the
        Content-Length and where draining gives up; raises :class:`ProtocolError` on a
        bad Content-Length (not kept: the next response with this head raises too)."""
        lower = self.headers.lower
        keep_alive = self.keep_alive
        give_up_at = EXCERPT + MAX_DRAIN
        transfer = lower.get("transfer-encoding")
        length = lower.get("content-length")
        if transfer is not None:
            if length is not None:
                # Both is how request smuggling starts: trust chunked, never reuse.
                keep_alive = False
            if transfer.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self.framing = (_CHUNK_SIZE, keep_alive, 0, give_up_at)
            else:
                self.framing = (_UNTIL_CLOSE, False, 0, give_up_at)
        elif length is not None:
            value = length.strip()
            if "," in value:  # a repeated header; allowed only when all copies agree
                copies = {v.strip() for v in value.split(",")}
                value = copies.pop() if len(copies) == 1 else ""
            # More than 19 digits is beyond any real body (and int() of a huge digit
            # string costs time): a protocol error, like a sign or a non-digit.
            if not value.isdigit() or not value.isascii() or len(value) > 19:
                raise ProtocolError(f"bad Content-Length {length[:40]!r}")
            remaining = int(value)
            if remaining > EXCERPT + MAX_DRAIN:
                # Too big to drain: take the excerpt, then close rather than read on.
                keep_alive = False
                give_up_at = EXCERPT
            self.framing = (_LENGTH if remaining else _DONE, keep_alive, remaining,
                            give_up_at)
        else:
            self.framing = (_UNTIL_CLOSE, False, 0, give_up_at)
        return self.framing


def _parse_head(head: bytes) -> _ParsedHead:
    """A response head parsed; raises :class:`ProtocolError` when it is malformed. A small
    head is memoised."""
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    if _STATUS_LINE.match(status_line) is None:
        raise ProtocolError(f"bad status line {status_line[:60]!r}")
    parsed = _ParsedHead(int(status_line[9:12]), status_line[13:], status_line[5:8],
                         _parse_fields(lines[1:]))
    if len(head) <= HEAD_MEMO_BYTES:
        if len(_HEADS) >= HEAD_MEMO_SIZE:
            _HEADS.clear()
        _HEADS[head] = parsed
    return parsed


def _parse_fields(lines: list[str]) -> Headers:
    headers = Headers()
    lower = headers.lower
    last: str | None = None
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t" or name[0] in " \t":
            if not line:
                continue
            if line[0] in " \t" and last is not None:
                # Obsolete line folding: the line continues the previous field's value.
                _fold(headers, last, line.strip())
                continue
            # The name only (a value may be a credential the server echoed back).
            raise ProtocolError(f"bad header line {name[:40] if sep else '(no colon)'!r}")
        key = name.lower()
        if key in lower:
            headers.add(name, value.strip())
        else:
            lower[key] = headers[name] = value.strip()
        last = name
    return headers


def _fold(headers: Headers, name: str, more: str) -> None:
    key = name.lower()
    value = f"{headers.lower[key]} {more}"
    headers.lower[key] = value
    shown = next(n for n in dict.keys(headers) if n.lower() == key)
    dict.__setitem__(headers, shown, value)


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise ProtocolError(f"bad chunk size {line[:40]!r}")
    return int(size, 16)


class _Target:
    """One URL, parsed once: where to connect and what to put in the request line."""

    __slots__ = ("authority", "basic_auth", "forward", "heads", "host", "host_header", "key",
                 "port", "proxy", "scheme", "target")

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        host = parts.hostname
        if not host:
            raise ValueError("the URL has no host")
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        port = parts.port or _DEFAULT_PORTS[scheme]
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
            raise ValueError("the URL's path or query contains spaces or control characters")
        shown = f"[{host}]" if ":" in host else host
        self.scheme = scheme
        self.host = host  # as create_connection and server_hostname want it (no brackets)
        self.port = port
        self.target = target
        self.authority = f"{shown}:{port}"  # for error texts
        self.host_header = shown if port == _DEFAULT_PORTS[scheme] else self.authority
        self.key: tuple[Any, ...] = (scheme, host, port)
        self.proxy: Proxy | None = None
        self.forward = False
        self.basic_auth: str | None = None
        # The fixed parts of request heads to this URL, by method and header names.
        self.heads: dict[tuple[str, tuple[str, ...]], _HeadParts] = {}
        if parts.username is not None:
            # As aiohttp did: credentials in the URL become Basic auth.
            pair = (f"{urllib.parse.unquote(parts.username)}:"
                    f"{urllib.parse.unquote(parts.password or '')}")
            self.basic_auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")

    def via(self, proxy: Proxy) -> None:
        """Route this target through ``proxy``. Its connections are keyed by the proxy
        too, so a pooled connection (or tunnel) only serves the route it was made for."""
        self.proxy = proxy
        self.heads.clear()
        self.key = (*self.key, proxy.host, proxy.port, proxy.authorization)
        if self.scheme == "http":
            # Plain http: the request line names the whole URL, and every request carries
            # the proxy's credentials (for https they go on the CONNECT only).
            self.forward = True
            self.target = f"http://{self.host_header}{self.target}"


class _Plan:
    """What to add around one set of header names (computed once per set): the names are
    the same for every request of a webhook, so this work is not per request."""

    __slots__ = ("auth", "auto", "drop", "host", "lines", "octet")

    def __init__(self, names: tuple[str, ...]) -> None:
        for name in names:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token; refused")
        lower = {n.lower() for n in names}
        # aiohttp sent these, in this order; receivers see the same headers as before.
        self.host = "host" not in lower
        self.auto = "".join(f"{k}: {v}\r\n" for k, v in (("Accept", "*/*"),
                            ("Accept-Encoding", "gzip, deflate")) if k.lower() not in lower)
        self.auth = "authorization" not in lower
        self.octet = "content-type" not in lower
        # The length is computed here; a caller's copy could disagree with the body.
        self.drop = frozenset(n for n in names
                              if n.lower() in ("content-length", "transfer-encoding"))
        self.lines = len(names) - len(self.drop)


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: ConnectionPool | None, key: tuple[Any, ...]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.deadline = 0.0  # of the request in flight (the pool's watch enforces it)
        self.closed = False
        self.registered = False  # counted by the pool (set once the connect succeeded)
        self.idle_since = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            # Bytes nobody asked for (on an idle connection): its framing is lost.
            self.abort()
            return
        try:
            done = parser.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if done:
            self._complete(parser)

    def eof_received(self) -> bool:
        parser = self.parser
        if parser is not None:
            try:
                parser.feed_eof()
            except ConnectionClosed as exc:
                self._fail(exc)
            else:
                self._complete(parser)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser = self.parser
        if parser is not None:
            if exc is None:
                self.eof_received()
            elif isinstance(exc, ssl.SSLError):
                self._fail(exc)
            else:
                self._fail(ConnectionClosed(
                    f"connection lost: {describe(exc)}", before_response=not parser.got_bytes
                    and isinstance(exc, (ConnectionResetError, ConnectionAbortedError,
                                         BrokenPipeError))))
        if self.registered and self.pool is not None:
            self.registered = False
            self.pool._lost(self)

    # -- used by the pool ----------------------------------------------------------------

    def timed_out(self) -> None:
        self._fail(asyncio.TimeoutError())

    def close(self) -> None:
        """Close gracefully (TLS close_notify); the pool counts it until it is lost."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _complete(self, parser: ResponseParser) -> None:
        self.parser = None
        response = parser.response
        assert response is not None
        if parser.leftover:
            response.keep_alive = False
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        self.parser = None
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()


class ConnectionPool:
    """The keep-alive connections of one webhook: at most ``limit`` open (idle, busy or
    connecting), idle ones reused most-recent first and closed after ``IDLE_TIMEOUT``.

    ``timeout`` bounds a whole attempt: connect, TLS handshake, request and response
    (the response part is checked by one pool-wide timer, so it fires up to
    ``timeout / 20``, at least 10 and at most 100 ms, late). ``ssl_context`` is called
    once, when the first https connection is opened. ``proxy`` chooses the proxy of each
    endpoint (None: always direct)."""

    def __init__(self, limit: int, timeout: float,
                 ssl_context: Callable[[], ssl.SSLContext] | None = None,
                 proxy: ProxyChoice | None = None) -> None:
        self.limit = max(limit, 1)
        self.proxy = proxy
        self.timeout = timeout
        self._ssl_factory = ssl_context
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[tuple[Any, ...], list[Connection]] = {}
        self._conns: set[Connection] = set()
        self._count = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._tick = min(max(timeout / 20, 0.01), 0.1)  # timeout resolution
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._targets: dict[str, _Target] = {}
        self._plans: dict[tuple[str, ...], _Plan] = {}
        # Counters for tests and diagnostics.
        self.connections_opened = 0
        self.stale_retries = 0

    @property
    def open_connections(self) -> int:
        return self._count

    @property
    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = self._ssl_factory() if self._ssl_factory is not None else (
                ssl.create_default_context())
        return self._ssl

    async def request(self, method: str, url: str, headers: dict[str, str],
                      body: bytes = b"") -> Response:
        """Send one request and return its response (the body cut to the excerpt).

        Raises asyncio.TimeoutError, ssl.SSLError (certificate and handshake failures),
        :class:`HTTPClientError` (connect, closed, malformed response) or ValueError (a
        header name or value with CR, LF or NUL)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise ConnectionClosed("the connection pool is closed")
        target = self._targets.get(url) or self._target(url)
        data = self._serialise(method, target, headers, body)
        head_only = method == "HEAD"
        deadline = loop.time() + self.timeout
        idle = self._idle.get(target.key)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                response = await self._start(conn, data, head_only, deadline)
            except ConnectionClosed as exc:
                conn.abort()
                if not exc.before_response:
                    raise
                # The server had closed this idle connection and the request never
                # reached it: once, at once, on a fresh connection (the other idle ones
                # may be just as stale).
                self.stale_retries += 1
                break
            except BaseException:
                conn.abort()  # its state is unknown (timeout, error, cancelled)
                raise
            self._release(conn, response)
            if target.forward and response.status == 407:
                raise ProxyAuthError(target.proxy)  # type: ignore[arg-type]
            return response
        conn = await self._open(target, deadline)
        try:
            response = await self._start(conn, data, head_only, deadline)
        except BaseException:
            conn.abort()
            raise
        self._release(conn, response)
        if target.forward and response.status == 407:
            raise ProxyAuthError(target.proxy)  # type: ignore[arg-type]
        return response

    def _start(self, conn: Connection, data: bytes, head_only: bool, deadline: float
               ) -> asyncio.Future[Response]:
        """Send ``data`` on ``conn``; the future of its response."""
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[Response] = loop.create_future()
        transport = conn.transport
        if transport is None or transport.is_closing():
            waiter.set_exception(ConnectionClosed("the connection was closed",
                                                  before_response=True))
            return waiter
        conn.parser = ResponseParser(head_only)
        conn.waiter = waiter
        conn.deadline = deadline
        transport.write(data)
        if self._watch is None:
            self._watch = loop.call_at(loop.time() + self._tick, self._check_deadlines)
        return waiter

    def _release(self, conn: Connection, response: Response) -> None:
        if response.keep_alive and not conn.closed and not self._closed:
            assert self._loop is not None
            conn.idle_since = self._loop.time()
            idle = self._idle.get(conn.key)
            if idle is None:
                idle = self._idle[conn.key] = []
            idle.append(conn)
            if self._sweeper is None:
                self._sweeper = self._loop.call_at(conn.idle_since + IDLE_TIMEOUT,
                                                   self._sweep)
            if self._waiters:
                self._wake()
        else:
            conn.close()

    def _check_deadlines(self) -> None:
        # One coarse timer per pool instead of one per request: a request's timeout
        # fires up to one tick late, which costs nothing per request.
        assert self._loop is not None
        self._watch = None
        now = self._loop.time()
        busy = False
        for conn in list(self._conns):
            if conn.parser is not None:
                if conn.deadline <= now:
                    conn.timed_out()
                else:
                    busy = True
        if busy:
            self._watch = self._loop.call_at(now + self._tick, self._check_deadlines)

    async def _open(self, target: _Target, deadline: float) -> Connection:
        loop = self._loop
        assert loop is not None
        while self._count >= self.limit:
            # Full: an idle connection to another origin makes room; else wait for one.
            victim = next((c for idle in self._idle.values() for c in idle), None)
            if victim is not None:
                self._idle[victim.key].remove(victim)
                victim.close()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0.0))
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if self._closed:
                raise ConnectionClosed("the connection pool is closed")
            idle = self._idle.get(target.key)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    # Released while we waited; fresh enough (it just answered).
                    return conn
        self._count += 1
        ssl_context = self.tls_context() if target.scheme == "https" else None
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError()
            if target.proxy is not None:
                conn = await self._via_proxy(target, target.proxy, ssl_context, deadline)
            else:
                _, conn = await asyncio.wait_for(loop.create_connection(
                    lambda: Connection(self, target.key), target.host, target.port,
                    ssl=ssl_context, server_hostname=target.host if ssl_context else None),
                    remaining)
        except BaseException as exc:
            self._count -= 1
            self._wake()
            if isinstance(exc, (asyncio.TimeoutError, ssl.SSLError)) or not isinstance(
                    exc, OSError) or isinstance(exc, HTTPClientError):
                raise
            raise ConnectError(f"cannot connect to {target.authority}: {describe(exc)}"
                               ) from None
        self.connections_opened += 1
        if conn.closed:
            # Lost between the handshake and now; connection_lost will not count it.
            self._count -= 1
            self._wake()
            raise ConnectionClosed(f"the connection to {target.authority} closed at once")
        conn.registered = True
        self._conns.add(conn)
        if self._closed:
            conn.abort()
            raise ConnectionClosed("the connection pool is closed")
        return conn

    async def _via_proxy(self, target: _Target, proxy: Proxy,
                         ssl_context: ssl.SSLContext | None, deadline: float) -> Connection:
        """A connection to ``target`` through ``proxy``: for https a CONNECT tunnel with
        TLS to the endpoint inside it; for http the proxy connection itself."""
        loop = self._loop
        assert loop is not None
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: Connection(self, target.key), proxy.host, proxy.port),
                max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise ProxyError(f"proxy connect failed: {proxy.authority} did not accept a"
                             " connection in time") from None
        except OSError as exc:
            raise ProxyError(f"proxy connect failed: cannot connect to {proxy.authority}"
                             f" (from {proxy.origin}): {describe(exc)}") from None
        if ssl_context is None:
            return conn
        try:
            await self._tunnel(conn, target, proxy, deadline)
            transport = await asyncio.wait_for(loop.start_tls(
                conn.transport, conn, ssl_context,  # type: ignore[arg-type]
                server_hostname=target.host), max(deadline - loop.time(), 0.0))
        except BaseException:
            conn.abort()
            raise
        if transport is None:  # the tunnel closed during the handshake
            raise ConnectionClosed(f"the tunnel to {target.authority} through"
                                   f" {proxy.authority} closed during the TLS handshake")
        conn.transport = transport  # type: ignore[assignment]
        return conn

    async def _tunnel(self, conn: Connection, target: _Target, proxy: Proxy,
                      deadline: float) -> None:
        """Ask the proxy for a tunnel (CONNECT host:port) and read its answer."""
        loop = self._loop
        assert loop is not None and conn.transport is not None
        auth = (f"Proxy-Authorization: {proxy.authorization}\r\n"
                if proxy.authorization else "")
        waiter: asyncio.Future[Response] = loop.create_future()
        conn.parser = ResponseParser(head_only=True)  # a CONNECT answer has no body for us
        conn.waiter = waiter
        conn.transport.write(f"CONNECT {target.authority} HTTP/1.1\r\nHost: {target.authority}"
                             f"\r\n{auth}\r\n".encode())
        asked = f"CONNECT {target.authority}"
        try:
            response = await asyncio.wait_for(waiter, max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise ProxyError(f"proxy connect failed: {proxy.authority} did not answer {asked}"
                             " in time") from None
        except HTTPClientError as exc:
            raise ProxyError(f"proxy connect failed: {proxy.authority} on {asked}: {exc}"
                             ) from None
        status = response.status
        if status == 407:
            raise ProxyAuthError(proxy)
        if not 200 <= status < 300:
            reason = f" {response.reason}" if response.reason else ""
            raise ProxyError(f"proxy connect failed: {proxy.authority} answered"
                             f" {status}{reason} to {asked}", config_problem=status < 500)

    def _lost(self, conn: Connection) -> None:
        self._count -= 1
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake()
        if self._drained is not None and not self._conns and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        assert self._loop is not None
        self._sweeper = None
        expired = self._loop.time() - IDLE_TIMEOUT
        oldest: float | None = None
        for idle in self._idle.values():
            # Oldest first: the list is used from its end.
            while idle and idle[0].idle_since <= expired:
                idle.pop(0).close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = self._loop.call_at(oldest + IDLE_TIMEOUT, self._sweep)

    async def close(self) -> None:
        """Close every connection (in-flight requests fail) and wait briefly for them."""
        self._closed = True
        for timer in (self._sweeper, self._watch):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._watch = None
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        for conn in list(self._conns):
            if conn.parser is not None:
                conn._fail(ConnectionClosed("the connection pool was closed"))
            else:
                conn.close()
        if self._conns and self._loop is not None:
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), 1.0)
            except asyncio.TimeoutError:
                for conn in list(self._conns):
                    conn.abort()

    # -- requests ----------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _Target(url)
            if self.proxy is not None:
                try:
                    proxy = self.proxy.select(target.scheme, target.host, target.port)
                except ProxyConfigError as error:
                    raise ProxyError(f"proxy misconfigured: {error}", config_problem=True
                                     ) from None
                if proxy is not None:
                    target.via(proxy)
            if len(self._targets) >= URL_CACHE_SIZE:
                del self._targets[next(iter(self._targets))]
            self._targets[url] = target
        return target

    def _serialise(self, method: str, target: _Target, headers: dict[str, str],
                   body: bytes) -> bytes:
        names = tuple(headers)
        # Cached: everything but the fields, the length and the body is the same for
        # every request of a webhook, and this runs once per request.
        parts = target.heads.get((method, names)) or self._head_parts(method, target,
                                                                       names, headers)
        start, extra, drop, lines, octet = parts
        if drop:
            fields = "".join([f"{k}: {v}\r\n" for k, v in headers.items() if k not in drop])
        else:
            fields = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
        # Each field line we wrote ends in one CRLF; any other CR or LF (or a NUL) came
        # from a name or value. render.py refuses those already: this is defence in depth.
        if fields.count("\n") != lines or fields.count("\r") != lines or "\0" in fields:
            _refuse(method, headers)
        return (f"{start}{fields}{extra}Content-Length: {len(body)}\r\n"
                f"{octet if body else ''}\r\n").encode() + body

    def _head_parts(self, method: str, target: _Target, names: tuple[str, ...],
                    headers: dict[str, str]) -> _HeadParts:
        """The parts of a request head that do not change between requests with the same
        method, URL and header names (checked once, here), cached on ``target``."""
        if method not in _METHODS:
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"method {method!r} is not an HTTP token; refused")
            _METHODS.add(method)
        plan = self._plans.get(names)
        if plan is None:
            plan = _Plan(names)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[names] = plan
        host = ""
        if plan.host:
            host = f"Host: {target.host_header}\r\n"
        extra = plan.auto
        if plan.auth and target.basic_auth is not None:
            extra += f"Authorization: {target.basic_auth}\r\n"
        if target.forward:
            proxy_auth = target.proxy.authorization  # type: ignore[union-attr]
            if proxy_auth:
                extra += f"Proxy-Authorization: {proxy_auth}\r\n"
        start = f"{method} {target.target} HTTP/1.1\r\n{host}"
        # The request line, Host and the extra lines: one CRLF each, as for the fields.
        fixed = start + extra
        lines = extra.count("\n") + (2 if host else 1)
        if fixed.count("\n") != lines or fixed.count("\r") != lines or "\0" in fixed:
            _refuse(method, headers)
        parts = (start, extra, plan.drop, plan.lines,
                 "Content-Type: application/octet-stream\r\n" if plan.octet else "")
        if len(target.heads) >= PLAN_CACHE_SIZE:
            target.heads.clear()
        target.heads[(method, names)] = parts
        return parts


def _refuse(method: str, headers: dict[str, str]) -> None:
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0"):
            # The name only: values can be credentials or signatures.
            raise ValueError(f"header {name!r}: the name or value contains CR, LF or NUL;"
                             " refused")
    raise ValueError(f"the request line ({method} ...) contains CR, LF or NUL; refused")


def describe(exc: BaseException) -> str:
    """``Type: text`` of an exception, for error texts (never a request header)."""
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"

