"""The HTTP/1.1 client of the delivery path (bridge/http1.py) against real servers on
127.0.0.1: aiohttp servers, an HTTPS one with a trustme CA, and small raw asyncio servers
that misbehave on purpose; the response parser is also fed every byte boundary."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import http1
from bridge.config import AuthConfig, TLSConfig, WebhookConfig
from bridge.delivery import USER_AGENT, Sender, classify_response
from bridge.render import Request

from .support import Certificates, free_port, wait_for

BODY = b'{"payload": {"seq": 1}, "x": "' + b"y" * 200 + b'"}'


# -- servers -----------------------------------------------------------------------------

Handler = Callable[["RawConnection"], Awaitable[None]]


class RawConnection:
    """One accepted connection of a :class:`RawServer`."""

    def __init__(self, index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, server: RawServer) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.server = server
        self.requests = 0

    async def request(self) -> bytes | None:
        """The next request (head and Content-Length body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        self.requests += 1
        self.server.requests.append(head + body)
        return head + body

    async def send(self, *parts: bytes) -> None:
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()

    async def eof(self) -> bool:
        """Wait until the client closes its side (True) or sends more bytes (False)."""
        try:
            return await self.reader.read(1) == b""
        except ConnectionError:
            return True


class RawServer:
    """A TCP server that runs ``handler`` for each connection and counts them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: list[RawConnection] = []
        self.requests: list[bytes] = []
        self.closed = 0  # connections whose handler has finished
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.connections:
            conn.writer.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        conn = RawConnection(len(self.connections), reader, writer, self)
        self.connections.append(conn)
        try:
            await self.handler(conn)
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()


def answer_all(response: bytes) -> Handler:
    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            await conn.send(response)
    return handler


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class AppServer:
    """An aiohttp server (HTTP or HTTPS) recording each request and its peer."""

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.seen: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        self.seen.append({"peer": transport.get_extra_info("peername"),
                          "raw_headers": request.raw_headers, "body": await request.read(),
                          "path_qs": request.raw_path,
                          "peercert": transport.get_extra_info("peercert")})
        if self.handler is not None:
            return await self.handler(request)
        return web.Response(text="ok")

    async def __aenter__(self) -> AppServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port,
                          ssl_context=self.ssl_context).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def webhook(url: str, **extra: Any) -> WebhookConfig:
    return WebhookConfig(name="w", url=url, allow_insecure_http=True, **extra)


def sample(url: str, headers: dict[str, str] | None = None) -> Request:
    return Request("POST", url, headers if headers is not None else {
        "Content-Type": "application/json", "User-Agent": USER_AGENT}, BODY)


# -- the request -------------------------------------------------------------------------

async def test_request_head_is_exact() -> None:
    async with RawServer(answer_all(OK)) as server:
        pool = http1.ConnectionPool(2, 5.0)
        response = await pool.request(
            "POST", f"{server.url}/ingest/d%2F1?site=a%26b&n=1#frag",
            {"Content-Type": "application/json", "User-Agent": "ua/1", "X-Site": "plant é",
             "webhook-id": "evt_1"}, b'{"a":1}')
        await pool.close()
    assert (response.status, response.body) == (200, b"ok")
    assert server.requests == [
        b"POST /ingest/d%2F1?site=a%26b&n=1 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Content-Type: application/json\r\nUser-Agent: ua/1\r\n"
        + "X-Site: plant é\r\n".encode() + b"webhook-id: evt_1\r\n"
        b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nContent-Length: 7\r\n\r\n"
        b'{"a":1}']


async def test_request_head_defaults_and_overrides() -> None:
    async with RawServer(answer_all(OK)) as server:
        pool = http1.ConnectionPool(2, 5.0)
        # The caller's Accept wins; its Content-Length is replaced by the real one; no
        # Content-Type gets aiohttp's default; an empty path is "/".
        await pool.request("PUT", server.url, {"Accept": "application/json",
                                               "content-length": "99"}, b"abc")
        await pool.request("POST", server.url.replace("http://", "http://u%40x:p%3A@"), {},
                           b"")
        await pool.close()
    assert server.requests == [
        b"PUT / HTTP/1.1\r\n" + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Content-Length: 3\r\nContent-Type: application/octet-stream\r\n\r\nabc",
        b"POST / HTTP/1.1\r\n" + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Authorization: Basic dUB4OnA6\r\nContent-Length: 0\r\n\r\n"]


def test_targets_host_header_and_ipv6() -> None:
    cases = {
        "http://Example.COM/a?b=1": ("example.com", 80, "/a?b=1", "example.com"),
        "https://example.com:443": ("example.com", 443, "/", "example.com"),
        "https://example.com:8443/x": ("example.com", 8443, "/x", "example.com:8443"),
        "http://[::1]:8080/v6": ("::1", 8080, "/v6", "[::1]:8080"),
        "https://[2001:db8::1]/": ("2001:db8::1", 443, "/", "[2001:db8::1]"),
    }
    for url, expected in cases.items():
        target = http1._Target(url)
        assert (target.host, target.port, target.target, target.host_header) == expected


async def test_ipv6_literal_host() -> None:
    try:
        server = await asyncio.start_server(lambda r, w: None, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server.close()
    await server.wait_closed()
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = http1.ConnectionPool(2, 5.0)
    try:
        response = await pool.request("GET", f"http://[::1]:{port}/six", {})
    finally:
        await pool.close()
        server.close()
    assert response.status == 200
    assert got[0].split(b"\r\n")[:2] == [b"GET /six HTTP/1.1", f"Host: [::1]:{port}".encode()]


@pytest.mark.parametrize("name, value", [("X-Note", "a\r\nX-Evil: 1"), ("X-Note", "a\nb"),
                                         ("X-Note", "a\rb"), ("X-Note", "nul\0"),
                                         ("X-Evil\r\nX", "v"), ("Bad Name", "v")])
async def test_header_injection_is_refused(name: str, value: str) -> None:
    async with RawServer(answer_all(OK)) as server:
        pool = http1.ConnectionPool(2, 5.0)
        with pytest.raises(ValueError) as caught:
            await pool.request("POST", server.url, {"Authorization": "Bearer s3cret",
                                                    name: value}, b"")
        await pool.close()
    text = str(caught.value)
    assert "refused" in text and "s3cret" not in text and "X-Evil: 1" not in text
    assert server.connections == []


async def test_sender_sends_the_headers_aiohttp_sent(tmp_path: Path) -> None:
    async with AppServer() as server:
        sender = Sender(webhook(server.url + "/ingest", auth=AuthConfig(type="bearer",
                                                                        token="tok")))
        await sender.start()
        request = sample(server.url + "/ingest/d1?x=%2F", {
            "Content-Type": "application/json", "User-Agent": USER_AGENT, "X-Site": "p7"})
        outcome = await sender.send(request, "evt_1")
        await sender.close()
    assert (outcome.kind, outcome.status, outcome.response) == ("delivered", 200, "ok")
    [seen] = server.seen
    # What aiohttp's client sent, in its order (checked when this client replaced it).
    names = [name.decode() for name, _ in seen["raw_headers"]]
    assert names == ["Host", "Content-Type", "User-Agent", "X-Site", "webhook-id",
                     "webhook-timestamp", "Authorization", "Accept", "Accept-Encoding",
                     "Content-Length"]
    values = dict((n.decode(), v.decode()) for n, v in seen["raw_headers"])
    assert values["Host"] == f"127.0.0.1:{server.port}"
    assert values["Authorization"] == "Bearer tok"
    assert values["Content-Length"] == str(len(BODY))
    assert (seen["path_qs"], seen["body"]) == ("/ingest/d1?x=%2F", BODY)


# -- keep-alive and the pool -------------------------------------------------------------

async def test_keep_alive_reuses_one_connection() -> None:
    async with AppServer() as server:
        pool = http1.ConnectionPool(5, 5.0)
        for n in range(20):
            response = await pool.request("POST", f"{server.url}/n/{n}", {}, BODY)
            assert (response.status, response.body, response.keep_alive) == (200, b"ok", True)
        assert pool.idle_connections == 1
        await pool.close()
    assert len(server.seen) == 20
    assert len({s["peer"] for s in server.seen}) == 1
    assert pool.connections_opened == 1


async def test_pool_never_exceeds_its_limit() -> None:
    gate = asyncio.Event()
    active = [0]
    most = [0]

    async def slow(request: web.Request) -> web.Response:
        active[0] += 1
        most[0] = max(most[0], active[0])
        await gate.wait()
        active[0] -= 1
        return web.Response(text="ok")

    async with AppServer(slow) as server:
        pool = http1.ConnectionPool(3, 10.0)  # concurrency 2 + 1
        tasks = [asyncio.create_task(pool.request("POST", server.url, {}, BODY))
                 for _ in range(12)]
        await wait_for(lambda: active[0] == 3, 5, "three requests in flight")
        assert pool.open_connections == 3
        gate.set()
        responses = await asyncio.gather(*tasks)
        await pool.close()
    assert [r.status for r in responses] == [200] * 12
    assert most[0] == 3
    assert len({s["peer"] for s in server.seen}) == 3
    assert pool.connections_opened == 3


async def test_idle_connections_are_reused_last_in_first_out() -> None:
    release = [asyncio.Event(), asyncio.Event()]

    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            if conn.requests == 1 and conn.index < 2:
                await release[conn.index].wait()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
                            + str(conn.index).encode())

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(3, 5.0)
        first = asyncio.create_task(pool.request("POST", server.url, {}, b""))
        second = asyncio.create_task(pool.request("POST", server.url, {}, b""))
        await wait_for(lambda: len(server.requests) == 2, 5, "two requests")
        release[0].set()
        assert (await first).body == b"0"
        release[1].set()
        assert (await second).body == b"1"
        # Connection 1 went idle last: it is used first, then connection 0.
        third = await pool.request("POST", server.url, {}, b"")
        assert third.body == b"1"
        both = await asyncio.gather(pool.request("POST", server.url, {}, b""),
                                    pool.request("POST", server.url, {}, b""))
        assert sorted(r.body for r in both) == [b"0", b"1"]
        await pool.close()
    assert pool.connections_opened == 2


async def test_connection_close_means_a_new_connection() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2"
                            b"\r\n\r\nok")
            await conn.eof()

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        for _ in range(3):
            response = await pool.request("POST", server.url, {}, b"")
            assert (response.status, response.keep_alive) == (200, False)
        await wait_for(lambda: server.closed == 3, 5, "the client to close each connection")
        await pool.close()
    assert len(server.connections) == 3 and pool.stale_retries == 0


async def test_server_closing_an_idle_connection_is_noticed() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(OK)  # keep-alive by default, but the server goes away

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        assert (await pool.request("POST", server.url, {}, b"")).status == 200
        await wait_for(lambda: pool.idle_connections == 0 and pool.open_connections == 0, 5,
                       "the pool to drop the closed connection")
        assert (await pool.request("POST", server.url, {}, b"")).status == 200
        await pool.close()
    assert len(server.connections) == 2 and pool.stale_retries == 0


async def test_stale_keep_alive_connection_is_retried_once_transparently() -> None:
    async def handler(conn: RawConnection) -> None:
        # Answers the first request of a connection; closes the connection when a
        # second one arrives, as a server does that dropped it while idle.
        if await conn.request() is not None:
            await conn.send(OK)
            await conn.request()

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        first = await pool.request("POST", server.url, {"webhook-id": "evt_1"}, b"1")
        second = await pool.request("POST", server.url, {"webhook-id": "evt_2"}, b"2")
        await pool.close()
    assert (first.status, second.status) == (200, 200)
    assert pool.stale_retries == 1
    assert len(server.connections) == 2
    assert [r.rsplit(b"\r\n", 1)[1] for r in server.requests] == [b"1", b"2", b"2"]


async def test_stale_retry_happens_only_once() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None and len(server.requests) == 1:
            await conn.send(OK)
            await conn.request()

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        assert (await pool.request("POST", server.url, {}, b"")).status == 200
        with pytest.raises(http1.ConnectionClosed, match="closed the connection without "
                           "answering"):
            await pool.request("POST", server.url, {}, b"")
        await pool.close()
    assert pool.stale_retries == 1
    assert (len(server.connections), len(server.requests)) == (2, 3)


async def test_idle_connections_close_after_the_idle_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "IDLE_TIMEOUT", 0.2)
    eofs: list[float] = []

    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            await conn.send(OK)
        eofs.append(time.monotonic())

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        await pool.request("POST", server.url, {}, b"")
        idle_at = time.monotonic()
        await wait_for(lambda: eofs, 5, "the idle connection to be closed")
        assert pool.open_connections == 0
        assert 0.15 <= eofs[0] - idle_at < 2.0
        await pool.close()


async def test_close_closes_idle_connections() -> None:
    async with RawServer(answer_all(OK)) as server:
        pool = http1.ConnectionPool(3, 5.0)
        await asyncio.gather(*(pool.request("POST", server.url, {}, b"") for _ in range(3)))
        assert pool.idle_connections == 3
        await pool.close()
        await wait_for(lambda: server.closed == 3, 5, "the server to see three EOFs")
        with pytest.raises(http1.ConnectionClosed, match="pool is closed"):
            await pool.request("POST", server.url, {}, b"")


# -- the response ------------------------------------------------------------------------

CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n"
           b"\r\n5;ext=1\r\nhello\r\n1\r\n,\r\nB \r\n 0123456789\r\n0\r\nX-Checksum: abc\r\n"
           b"X-More: 1\r\n\r\n")
RESPONSES: list[tuple[bytes, int, bytes, bool, dict[str, str] | None]] = [
    (CHUNKED, 200, b"hello, 0123456789", True, {"X-Checksum": "abc", "X-More": "1"}),
    (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     201, b"abc", True, None),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
     b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found", 404, b"not found",
     True, None),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False, None),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", 200,
     b"ok", True, None),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", 204, b"", True, None),
    (b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nConnection: close\r\nContent-Length: 4\r\n"
     b"\r\nbusy", 503, b"busy", False, None),
]


def parse_in_pieces(raw: bytes, cuts: list[int]) -> http1.ResponseParser:
    parser = http1.ResponseParser()
    done = False
    previous = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]:
        assert not done, "complete before the last byte"
        done = parser.feed(raw[previous:cut])
        previous = cut
    assert done
    return parser


def check(parser: http1.ResponseParser, status: int, body: bytes, keep_alive: bool,
          trailers: dict[str, str] | None) -> None:
    response = parser.response
    assert response is not None and not parser.leftover
    assert (response.status, response.body, response.keep_alive) == (status, body,
                                                                       keep_alive)
    assert (dict(response.trailers) if response.trailers is not None else None) == trailers


@pytest.mark.parametrize("case", range(len(RESPONSES)))
def test_parser_at_every_byte_boundary(case: int) -> None:
    raw, *expected = RESPONSES[case]
    for cut in range(len(raw) + 1):
        check(parse_in_pieces(raw, [cut]), *expected)
    check(parse_in_pieces(raw, list(range(len(raw)))), *expected)  # one byte at a time


@settings(max_examples=300, deadline=None)
@given(case=st.integers(0, len(RESPONSES) - 1),
       cuts=st.lists(st.integers(0, 400), max_size=12))
def test_parser_in_random_pieces(case: int, cuts: list[int]) -> None:
    raw, *expected = RESPONSES[case]
    check(parse_in_pieces(raw, [c for c in cuts if c <= len(raw)]), *expected)


def test_parser_reads_until_close_and_flags_leftovers() -> None:
    parser = http1.ResponseParser()
    assert not parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhel")
    assert not parser.feed(b"lo")
    assert parser.feed_eof()
    assert parser.response is not None
    assert (parser.response.body, parser.response.keep_alive) == (b"hello", False)
    parser = http1.ResponseParser()
    assert parser.feed(OK + b"HTTP/1.1 200 OK\r\n")
    assert parser.leftover
    parser = http1.ResponseParser(head_only=True)
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert parser.response is not None and parser.response.body == b""


@pytest.mark.parametrize("raw, message", [
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"),
    (b"ICY 200 OK\r\n\r\n", "bad status line"),
    ("HTTP/1.1 ²00 OK\r\n\r\n".encode("latin-1"), "bad status line"),
    ("HTTP/1.² 200 OK\r\n\r\n".encode("latin-1"), "bad status line"),
    (b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n",
     "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1" + b"0" * 19 + b"\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 6000 + b"\r\n\r\n",
     "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX", "not followed by CRLF"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "larger than 64 KB"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000, "larger than 64 KB"),
])
def test_parser_refuses_malformed_responses(raw: bytes, message: str) -> None:
    parser = http1.ResponseParser()
    with pytest.raises(http1.ProtocolError, match=message) as caught:
        parser.feed(raw)
    assert str(caught.value).startswith("invalid HTTP response: ")


def test_headers_ignore_case_but_keep_it_for_display() -> None:
    parser = http1.ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\ncontent-TYPE: text/plain\r\nX-A: 1\r\n"
                       b"x-a: 2\r\nContent-Length: 0\r\n\r\n")
    assert parser.response is not None
    headers = parser.response.headers
    assert dict(headers) == {"content-TYPE": "text/plain", "X-A": "1, 2",
                             "Content-Length": "0"}
    assert headers["Content-Type"] == headers.get("content-type") == "text/plain"
    assert "X-a" in headers and headers.get("missing", "-") == "-"


async def test_content_length_split_across_reads_and_chunked_with_trailers() -> None:
    async def handler(conn: RawConnection) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-", b"Length: 10\r\n\r", b"\n01234",
                        b"56789")
        await conn.request()
        await conn.send(*(CHUNKED[i:i + 7] for i in range(0, len(CHUNKED), 7)))
        while await conn.request() is not None:
            await conn.send(OK)

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        first = await pool.request("POST", server.url, {}, b"")
        second = await pool.request("POST", server.url, {}, b"")
        third = await pool.request("POST", server.url, {}, b"")
        await pool.close()
    assert (first.status, first.body) == (200, b"0123456789")
    assert (second.body, dict(second.trailers or {})) == (
        b"hello, 0123456789", {"X-Checksum": "abc", "X-More": "1"})
    assert third.body == b"ok"
    assert len(server.connections) == 1


async def test_read_until_close_http10_and_interim_responses() -> None:
    answers = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
               b"HTTP/1.0 202 Accepted\r\nContent-Length: 4\r\n\r\nlate",
               b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    async def handler(conn: RawConnection) -> None:
        await conn.request()
        answer = answers[conn.index]
        if conn.index == 1:  # HTTP/1.0 without keep-alive: the client closes
            await conn.send(answer)
            await conn.eof()
        else:
            await conn.send(answer)
        if conn.index == 2:
            await conn.request()
            await conn.send(OK)

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 5.0)
        until_close = await pool.request("POST", server.url, {}, b"")
        http10 = await pool.request("POST", server.url, {}, b"")
        interim = await pool.request("POST", server.url, {}, b"")
        again = await pool.request("POST", server.url, {}, b"")
        await pool.close()
    assert (until_close.status, until_close.body, until_close.keep_alive) == (
        200, b"until close", False)
    assert (http10.status, http10.version, http10.body, http10.keep_alive) == (
        202, "1.0", b"late", False)
    assert (interim.status, interim.interim, interim.body) == (200, 1, b"ok")
    assert again.body == b"ok"
    assert len(server.connections) == 3  # the last two requests shared one


async def test_large_bodies_are_drained_or_the_connection_closed() -> None:
    small = b"a" * (512 * 1024)

    async def handler(conn: RawConnection) -> None:
        while (request := await conn.request()) is not None:
            # The big ones stall after their first part: a client that tried to read
            # them to the end would time out instead of answering at once.
            if b"/chunked" in request:
                head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                piece = b"%x\r\n%s\r\n" % (64 * 1024, b"c" * 64 * 1024)
                await conn.send(head, *([piece] * 24))
                await conn.eof()
            elif b"/huge" in request:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                % (5 * 1024 * 1024), b"b" * 64 * 1024)
                await conn.eof()
            else:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                % len(small), small)

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 30.0)
        started = time.monotonic()
        drained = await pool.request("GET", server.url + "/small", {})
        reused = await pool.request("GET", server.url + "/small", {})
        assert pool.connections_opened == 1
        big = await pool.request("GET", server.url + "/huge", {})
        chunked = await pool.request("GET", server.url + "/chunked", {})
        after = await pool.request("GET", server.url + "/small", {})
        elapsed = time.monotonic() - started
        await wait_for(lambda: server.closed == 2, 5, "the big ones' connections to close")
        await pool.close()
    assert elapsed < 10
    assert (drained.body, drained.keep_alive, reused.keep_alive) == (b"a" * 1024, True, True)
    assert (big.status, big.body, big.keep_alive) == (200, b"b" * 1024, False)
    assert (chunked.body, chunked.keep_alive) == (b"c" * 1024, False)
    assert after.body == b"a" * 1024
    # One for the two small ones and the huge one, one for the chunked one (neither is
    # kept after its big body), one for the last.
    assert pool.connections_opened == 3


async def test_gzip_excerpt_is_decoded() -> None:
    text = "".join(f"line {n}: the quick brown fox {n * 7919 % 1000}\n" for n in range(3000))
    compressed = gzip.compress(text.encode())
    assert len(compressed) > 4 * http1.EXCERPT

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/short":
            body, status = gzip.compress(b"bad reading: temp"), 422
        elif request.path == "/deflate":
            body, status = zlib.compress(b"deflated error"), 400
        elif request.path == "/broken":
            body, status = b"not gzip at all", 500
        else:
            body, status = compressed, 500
        return web.Response(body=body, status=status, headers={"Content-Encoding": (
            "deflate" if request.path == "/deflate" else "gzip")})

    async with AppServer(handler) as server:
        sender = Sender(webhook(server.url))
        await sender.start()
        outcomes = {path: await sender.send(sample(server.url + path), "evt_1")
                    for path in ("/short", "/deflate", "/broken", "/long")}
        await sender.close()
    assert outcomes["/short"].response == "bad reading: temp"
    assert outcomes["/short"].kind == "dead"
    assert outcomes["/deflate"].response == "deflated error"
    assert outcomes["/broken"].response == "not gzip at all"
    long = outcomes["/long"].response or ""
    assert 100 < len(long) <= http1.EXCERPT and text.startswith(long)


async def test_lowercase_retry_after_is_honoured() -> None:
    assert classify_response(429, {"retry-after": "7"}, "").retry_after == 7.0
    assert classify_response(503, {"RETRY-AFTER": "5"}, "").retry_after == 5.0
    assert classify_response(400, {"Webhook-Delivery": "abort-message"}, "").kind == "dead"
    answer = (b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 4\r\n"
              b"\r\nslow")
    async with RawServer(answer_all(answer)) as server:
        sender = Sender(webhook(server.url))
        await sender.start()
        outcome = await sender.send(sample(server.url), "evt_1")
        await sender.close()
    assert (outcome.kind, outcome.status, outcome.retry_after, outcome.response) == (
        "retry", 429, 7.0, "slow")
    assert outcome.headers == {"retry-after": "7", "content-length": "4"}
    assert not outcome.counts_as_failure


# -- failures ------------------------------------------------------------------------------

async def test_timeout_on_a_server_that_never_answers() -> None:
    async def handler(conn: RawConnection) -> None:
        await conn.request()
        await conn.eof()  # never answers; returns when the client gives up

    async with RawServer(handler) as server:
        pool = http1.ConnectionPool(2, 0.3)
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await pool.request("POST", server.url, {}, b"")
        elapsed = time.monotonic() - started
        await wait_for(lambda: server.closed == 1, 5, "the client to close the connection")
        assert 0.3 <= elapsed < 1.5
        assert pool.open_connections == 0
        sender = Sender(webhook(server.url, timeout=0.3))
        await sender.start()
        outcome = await sender.send(sample(server.url), "evt_1")
        await sender.close()
        await pool.close()
    assert (outcome.kind, outcome.cause, outcome.counts_as_failure) == ("retry", "timed out",
                                                                        False)


async def test_refused_and_malformed_are_connection_failures() -> None:
    port = free_port()
    sender = Sender(webhook(f"http://127.0.0.1:{port}"))
    await sender.start()
    refused = await sender.send(sample(f"http://127.0.0.1:{port}/x"), "evt_1")
    await sender.close()
    assert refused.cause.startswith(f"connection failed: cannot connect to 127.0.0.1:{port}: ")
    assert "ConnectionRefusedError" in refused.cause and not refused.counts_as_failure

    async with RawServer(answer_all(b"HTTP/1.1 20 OK\r\n\r\n")) as server:
        sender = Sender(webhook(server.url))
        await sender.start()
        garbage = await sender.send(sample(server.url), "evt_1")
        await sender.close()
    assert garbage.cause == ("connection failed: invalid HTTP response: bad status line "
                             "'HTTP/1.1 20 OK'")
    assert garbage.status is None and not garbage.counts_as_failure


async def test_error_texts_never_hold_header_values() -> None:
    async def handler(conn: RawConnection) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")

    async with RawServer(handler) as server:
        sender = Sender(webhook(server.url, auth=AuthConfig(type="bearer", token="s3cret")))
        await sender.start()
        outcome = await sender.send(sample(server.url), "evt_1")
        await sender.close()
    assert outcome.cause == ("connection failed: the server closed the connection in the "
                             "middle of the response")
    assert "s3cret" not in repr(outcome)


# -- TLS -------------------------------------------------------------------------------------

async def test_tls_verified_refused_and_mtls(tmp_path: Path, certs: Certificates) -> None:
    client = certs.ca.issue_cert("bridge-client")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    async with AppServer(ssl_context=certs.server_context()) as plain, \
            AppServer(ssl_context=certs.server_context(require_client_cert=True)) as mtls:
        trusted = TLSConfig(ca_file=str(certs.ca_file))
        outcomes = {}
        for name, hook in {
            "verified": webhook(plain.url, tls=trusted),
            "unknown ca": webhook(plain.url),
            "mtls": webhook(mtls.url, tls=TLSConfig(ca_file=str(certs.ca_file),
                                                    cert_file=str(cert_file),
                                                    key_file=str(key_file))),
            "mtls without cert": webhook(mtls.url, tls=trusted),
        }.items():
            sender = Sender(hook)
            await sender.start()
            outcomes[name] = await sender.send(sample(hook.url + "/x"), "evt_1")
            if name == "verified":  # and the TLS connection is kept alive
                await sender.send(sample(hook.url + "/y"), "evt_2")
            await sender.close()
    assert (outcomes["verified"].kind, outcomes["verified"].response) == ("delivered", "ok")
    assert len({s["peer"] for s in plain.seen}) == 1 and len(plain.seen) == 2
    unknown = outcomes["unknown ca"]
    assert unknown.cause.startswith("TLS failure: ") and unknown.counts_as_failure
    assert "certificate verify failed" in unknown.cause
    assert outcomes["mtls"].kind == "delivered"
    [seen] = mtls.seen  # the server saw the client's certificate
    assert seen["peercert"]["subjectAltName"] == (("DNS", "bridge-client"),)
    refused = outcomes["mtls without cert"]
    assert refused.kind == "retry" and refused.status is None, refused


async def test_tls_checks_the_url_host(tmp_path: Path, certs: Certificates) -> None:
    other = certs.ca.issue_cert("other.example")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.configure_cert(context)
    async with AppServer(ssl_context=context) as server:
        sender = Sender(webhook(server.url, tls=TLSConfig(ca_file=str(certs.ca_file))))
        await sender.start()
        outcome = await sender.send(sample(server.url), "evt_1")
        await sender.close()
    assert outcome.cause.startswith("TLS failure: ") and "certificate verify failed" in (
        outcome.cause)
    assert "IP address mismatch" in outcome.cause
    assert server.seen == []
