"""The common-case shortcuts of bridge/http1.py: a response head parsed straight from the
read that holds it (and a small body taken with it), parsed heads memoised by their
bytes, and the fixed parts of request heads cached per URL. Each must give exactly what
the general path gives, errors included: checked on exact examples and, with hypothesis,
on generated responses (valid and malformed) read whole, in pieces and byte by byte."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import http1
from bridge.proxy import Proxy

AIOHTTP_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
              b"Content-Length: 16\r\nDate: Sat, 05 Dec 2026 09:00:00 GMT\r\n"
              b"Server: Python/3.11 aiohttp/3.9.5\r\n\r\n{\"status\": \"ok\"}")


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    http1._HEADS.clear()
    yield
    http1._HEADS.clear()


def outcome(pieces: list[bytes], head_only: bool = False) -> tuple[Any, ...]:
    """Everything a caller can see after feeding ``pieces`` (then EOF if still open)."""
    parser = http1.ResponseParser(head_only)
    try:
        done = False
        for piece in pieces:
            done = parser.feed(piece)
        if not done:
            parser.feed_eof()
    except http1.HTTPClientError as exc:
        return ("error", type(exc).__name__, str(exc))
    response = parser.response
    assert response is not None
    trailers = response.trailers
    return (response.status, response.reason, response.version, list(response.headers.items()),
            sorted(response.headers.lower.items()), response.body, response.keep_alive,
            response.interim, parser.leftover, response.text(),
            None if trailers is None else (list(trailers.items()), sorted(trailers.lower.items())))


# -- exact results of the fast path ----------------------------------------------------

def test_whole_response_in_one_read_is_parsed_exactly() -> None:
    parser = http1.ResponseParser()
    assert parser.feed(AIOHTTP_OK)
    response = parser.response
    assert response is not None and not parser.leftover
    assert (response.status, response.reason, response.version, response.body,
            response.keep_alive, response.interim, response.trailers) == (
        200, "OK", "1.1", b'{"status": "ok"}', True, 0, None)
    assert dict(response.headers) == {
        "Content-Type": "application/json; charset=utf-8", "Content-Length": "16",
        "Date": "Sat, 05 Dec 2026 09:00:00 GMT", "Server": "Python/3.11 aiohttp/3.9.5"}
    assert response.headers.lower == {
        "content-type": "application/json; charset=utf-8", "content-length": "16",
        "date": "Sat, 05 Dec 2026 09:00:00 GMT", "server": "Python/3.11 aiohttp/3.9.5"}
    assert response.text() == '{"status": "ok"}'
    # Nothing left buffered: the parser is finished, later bytes are leftovers.
    assert parser.feed(b"x") and parser.leftover


@pytest.mark.parametrize("raw, done, body, leftover", [
    (AIOHTTP_OK[:-3], False, None, False),  # body not all there: the general loop waits
    (AIOHTTP_OK + b"HTTP/1.1", True, b'{"status": "ok"}', True),  # bytes after the end
    (AIOHTTP_OK[:AIOHTTP_OK.index(b"\r\n\r\n") + 2], False, None, False),  # head unfinished
])
def test_one_read_that_is_not_exactly_one_response(raw: bytes, done: bool,
                                                   body: bytes | None, leftover: bool) -> None:
    parser = http1.ResponseParser()
    assert parser.feed(raw) is done
    assert parser.leftover is leftover
    if done:
        assert parser.response is not None and parser.response.body == body
    else:
        assert parser.feed(AIOHTTP_OK[len(raw):])
        assert parser.response is not None
        assert parser.response.body == b'{"status": "ok"}' and not parser.leftover


def test_body_longer_than_the_excerpt_in_one_read() -> None:
    body = bytes(range(256)) * 5  # 1280 bytes: more than the 1024-byte excerpt
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 1280\r\n\r\n" + body
    parser = http1.ResponseParser()
    assert parser.feed(raw) and not parser.leftover
    assert parser.response is not None
    assert (parser.response.body, parser.response.keep_alive) == (body[:1024], True)


@pytest.mark.parametrize("raw, message", [
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "bad status line 'HTTP/1.1 2x0 OK'"),
    (b"HTTP/1.1 200OK\r\n\r\n", "bad status line 'HTTP/1.1 200OK'"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "bad status line 'HTTP/1.1  200 OK'"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "bad status line 'HTTP/2.0 200 OK'"),
    (b"HTTP/1.1 200\n OK\r\n\r\n", "bad status line 'HTTP/1.1 200\\n OK'"),
    ("HTTP/1.1 20³ OK\r\n\r\n".encode("latin-1"), "bad status line 'HTTP/1.1 20³ OK'"),
    (b"HTTP/1.1 200 OK\r\n Lead: x\r\n\r\n", "bad header line"),  # folding, nothing before
    (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", "bad header line 'Name '"),
    (b"HTTP/1.1 200 OK\r\n: x\r\n\r\n", "bad header line ''"),
    (b"HTTP/1.1 200 OK\r\nX-Secret-Only\r\n\r\n", "bad header line '(no colon)'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\nhello", "bad Content-Length"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101"),
])
def test_malformed_heads_fail_the_same_whole_or_in_pieces(raw: bytes, message: str) -> None:
    whole = outcome([raw])
    assert whole[:2] == ("error", "ProtocolError") and message in whole[2]
    assert outcome([raw[i:i + 1] for i in range(len(raw))]) == whole
    assert outcome([raw]) == whole  # again, with the memo as the first read left it
    if "status line" in message or "header line" in message:
        assert not http1._HEADS  # a head that does not parse is not memoised


# -- the parsed-head memo --------------------------------------------------------------

def test_memoised_head_gives_independent_equal_headers() -> None:
    first = http1.ResponseParser()
    assert first.feed(AIOHTTP_OK)
    assert len(http1._HEADS) == 1
    second = http1.ResponseParser()
    assert second.feed(AIOHTTP_OK)
    assert first.response is not None and second.response is not None
    one, two = first.response.headers, second.response.headers
    assert one is not two and one.lower is not two.lower
    assert list(one.items()) == list(two.items()) and one.lower == two.lower
    one.add("X-Added", "1")
    assert "X-Added" not in two and "x-added" not in two.lower
    third = http1.ResponseParser()
    assert third.feed(AIOHTTP_OK)
    assert third.response is not None and "X-Added" not in third.response.headers


def test_memo_is_bounded_in_entries_and_in_head_size() -> None:
    for i in range(http1.HEAD_MEMO_SIZE * 3):
        parser = http1.ResponseParser()
        assert parser.feed(f"HTTP/1.1 200 OK\r\nX-Request-Id: {i}\r\nContent-Length: 0"
                           "\r\n\r\n".encode())
        assert parser.response is not None
        assert parser.response.headers["x-request-id"] == str(i)
        assert 1 <= len(http1._HEADS) <= http1.HEAD_MEMO_SIZE
    http1._HEADS.clear()
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * http1.HEAD_MEMO_BYTES + b"\r\n\r\n"
    parser = http1.ResponseParser(head_only=True)
    assert parser.feed(big)
    assert parser.response is not None and len(parser.response.headers["X-Big"]) == 1024
    assert not http1._HEADS


def test_memo_does_not_carry_over_what_depends_on_the_request() -> None:
    # The same head for a HEAD request, then for a POST: the framing is per parser.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    head_only = http1.ResponseParser(head_only=True)
    assert head_only.feed(raw)
    assert head_only.response is not None and head_only.response.body == b""
    post = http1.ResponseParser()
    assert not post.feed(raw)
    assert post.feed(b"hello")
    assert post.response is not None and post.response.body == b"hello"
    # Interim responses count per parser, whether their head was memoised or not.
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" * 2 + AIOHTTP_OK
    for _ in range(2):
        parser = http1.ResponseParser()
        assert parser.feed(raw)
        assert parser.response is not None
        assert (parser.response.interim, parser.response.status) == (2, 200)


DRAIN = 1024 + 1024 * 1024  # excerpt + MAX_DRAIN: where draining a body gives up


@pytest.mark.parametrize("raw, framing, keep_alive, body", [
    (AIOHTTP_OK, (http1._LENGTH, True, 16, DRAIN), True, b'{"status": "ok"}'),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", (http1._DONE, True, 0, DRAIN),
     True, b""),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", (http1._LENGTH, False, 2, DRAIN),
     False, b"ok"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1100,
     (http1._LENGTH, False, 2000000, 1024), False, b"x" * 1024),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", (http1._CHUNK_SIZE, False, 0, DRAIN), False, b"abc"),
])
def test_memoised_framing_is_exact_and_reused(raw: bytes, framing: tuple[int, bool, int, int],
                                              keep_alive: bool, body: bytes) -> None:
    head = raw[:raw.index(b"\r\n\r\n")]
    for _ in range(2):  # parsed, then from the memo
        parser = http1.ResponseParser()
        assert parser.feed(raw)
        assert parser.response is not None
        assert (parser.response.keep_alive, parser.response.body) == (keep_alive, body)
        assert http1._HEADS[head].framing == framing


# -- generated responses: one read == pieces == byte by byte, memo cold == warm -------

STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                b"HTTP/1.1 404", b"HTTP/1.1 503 ", b"HTTP/1.1 302 Found", b"HTTP/1.1 2x0 OK",
                b"HTTP/1.2 200 OK", b"HTTP/1.1 200\rOK", b"HTTP/1.1 304 Not Modified",
                b"ICY 200 OK", "HTTP/1.1 ²00 OK".encode("latin-1"), b"HTTP/1.1 101 Up"]
FIELDS = [b"Content-Type: text/plain", b"content-type:text/plain ", b"X-A: 1", b"x-a:  2",
          b"X-Empty:", b"X-Tab:\tv\t", b"Connection: close", b"Connection: keep-alive",
          b"connection: Keep-Alive, Upgrade", b"Transfer-Encoding: chunked",
          b"Transfer-Encoding: gzip", b"Content-Encoding: gzip", b"Retry-After: 3",
          b" folded more", b"\tfolded", b"NoColon", b"Bad Name: x", b" Lead: x", b"Trail : x",
          b"X-Latin: caf\xe9", b"X-Ctl: a\x0bb", b"X-Nbsp: \xa0v\xa0", b"X-Colon: a:b:c",
          b"Content-Length: 5", b"Content-Length: 5, 5", b"Content-Length: 5, 6",
          b"Content-Length: 0", b"Content-Length: +5", b"Content-Length: 3000000",
          b"content-length: 12", b"X-Bare\rCR: 1", b"X-Bare-LF: a\nb"]
BODIES = [b"", b"hello", b"hello world, hello", b"5\r\nhello\r\n0\r\n\r\n",
          b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"zz\r\n", b"HTTP/1.1 200 OK\r\n"]


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    heads = []
    for _ in range(draw(st.integers(0, 1))):  # sometimes an interim response first
        heads.append(b"HTTP/1.1 100 Continue" + b"".join(
            b"\r\n" + f for f in draw(st.lists(st.sampled_from(FIELDS[:3]), max_size=2))))
    status = draw(st.sampled_from(STATUS_LINES))
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=6))
    heads.append(status + b"".join(b"\r\n" + f for f in fields))
    return b"".join(h + b"\r\n\r\n" for h in heads) + draw(st.sampled_from(BODIES))


@settings(max_examples=400, deadline=None)
@given(raw=responses(), cuts=st.lists(st.integers(0, 300), max_size=6),
       head_only=st.booleans())
def test_fast_path_and_memo_match_the_general_parser(raw: bytes, cuts: list[int],
                                                     head_only: bool) -> None:
    http1._HEADS.clear()
    byte_by_byte = outcome([raw[i:i + 1] for i in range(len(raw))], head_only)
    http1._HEADS.clear()
    whole = outcome([raw], head_only)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    pieces = outcome([raw[a:b] for a, b in itertools.pairwise(bounds)], head_only)
    warm = outcome([raw], head_only)  # the memo holds this head now (unless malformed)
    assert whole == byte_by_byte == pieces == warm


# -- request heads: the cached fixed parts ----------------------------------------------

HEADERS = {"Content-Type": "application/json", "webhook-id": "msg_1"}


def test_request_head_parts_are_cached_per_url_method_and_names() -> None:
    pool = http1.ConnectionPool(1, 5.0)
    target = pool._target("http://u:p@example.com:8080/in?x=1")
    first = pool._serialise("POST", target, HEADERS, b"{}")
    assert first == (b"POST /in?x=1 HTTP/1.1\r\nHost: example.com:8080\r\n"
                     b"Content-Type: application/json\r\nwebhook-id: msg_1\r\n"
                     b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
                     b"Authorization: Basic dTpw\r\nContent-Length: 2\r\n\r\n{}")
    assert list(target.heads) == [("POST", ("Content-Type", "webhook-id"))]
    assert pool._serialise("POST", target, {**HEADERS, "webhook-id": "msg_2"}, b"") == (
        first.replace(b"msg_1", b"msg_2").replace(b"Length: 2", b"Length: 0")[:-2])
    assert pool._serialise("PUT", target, {"X-A": "1"}, b"ab") == (
        b"PUT /in?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nX-A: 1\r\n"
        b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Authorization: Basic dTpw\r\nContent-Length: 2\r\n"
        b"Content-Type: application/octet-stream\r\n\r\nab")
    assert len(target.heads) == 2
    for i in range(http1.PLAN_CACHE_SIZE * 2):
        pool._serialise("POST", target, {f"X-{i}": "v"}, b"")
        assert len(target.heads) <= http1.PLAN_CACHE_SIZE


@pytest.mark.parametrize("headers, message", [
    ({"Content-Type": "application/json", "webhook-id": "a\r\nX-Evil: 1"},
     "header 'webhook-id': the name or value contains CR, LF or NUL"),
    ({"Content-Type": "application/json", "webhook-id": "a\nb"}, "header 'webhook-id'"),
    ({"Content-Type": "application/json", "webhook-id": "a\rb"}, "header 'webhook-id'"),
    ({"Content-Type": "application/json", "webhook-id": "a\0b"}, "header 'webhook-id'"),
])
def test_injection_is_refused_with_the_parts_cached(headers: dict[str, str],
                                                     message: str) -> None:
    pool = http1.ConnectionPool(1, 5.0)
    target = pool._target("http://example.com/in")
    for _ in range(2):  # a miss of the cache, then a hit
        with pytest.raises(ValueError, match=message):
            pool._serialise("POST", target, headers, b"{}")
        pool._serialise("POST", target, HEADERS, b"{}")


def test_bad_method_is_refused_before_anything_is_cached() -> None:
    pool = http1.ConnectionPool(1, 5.0)
    target = pool._target("http://example.com/in")
    for _ in range(2):
        with pytest.raises(ValueError, match="method 'PO ST' is not an HTTP token"):
            pool._serialise("PO ST", target, HEADERS, b"")
    assert not target.heads


def test_routing_through_a_proxy_drops_the_cached_parts() -> None:
    pool = http1.ConnectionPool(1, 5.0)
    target = http1._Target("http://example.com/in")
    pool._serialise("POST", target, {}, b"")
    target.via(Proxy("proxy.lan", 3128, "Basic cDpx", "p", "q", "http://proxy.lan:3128"))
    assert not target.heads
    assert pool._serialise("POST", target, {}, b"") == (
        b"POST http://example.com/in HTTP/1.1\r\nHost: example.com\r\n"
        b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Proxy-Authorization: Basic cDpx\r\nContent-Length: 0\r\n\r\n")
