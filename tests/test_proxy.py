"""Issue 14: webhooks through an HTTP proxy (SPEC §2 ``proxy``).

Pure tests of NO_PROXY matching and proxy selection, then http1 and the daemon (a real
subprocess) against a real proxy: :class:`TestProxy`, a small asyncio HTTP proxy that
tunnels CONNECT, forwards absolute-form requests, can demand Basic credentials and
records what it relayed."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge import admin, http1, logs
from bridge.config import ConfigError, WebhookConfig, dump_webhook, load_config
from bridge.delivery import classify_exception
from bridge.proxy import (
    ProxyChoice,
    from_environment,
    no_proxy_matches,
    parse_proxy_url,
    redact_proxy_url,
)

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    https_webhook,
    run_cli,
    started,
    wait_for,
)

# -- NO_PROXY and proxy selection (pure) ------------------------------------------------

@pytest.mark.parametrize(("no_proxy", "host", "port", "expected"), [
    ("*", "api.example.com", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),  # a domain covers its subdomains
    ("example.com", "notexample.com", 443, False),  # ... but not a longer name
    (".example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, True),  # curl: the leading dot is ignored
    ("*.example.com", "a.b.example.com", 443, True),
    ("EXAMPLE.com", "Api.Example.COM", 443, True),
    ("example.com.", "example.com", 443, True),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 443, False),
    ("localhost, 127.0.0.1", "127.0.0.1", 80, True),
    ("localhost,127.0.0.1", "127.0.0.2", 80, False),
    ("10.0.0.0/8", "10.20.30.40", 443, True),
    ("10.0.0.0/8", "11.0.0.1", 443, False),
    ("10.0.0.0/8", "ten.example", 443, False),
    ("::1", "::1", 443, True),
    ("[::1]:8080", "::1", 8080, True),
    ("[::1]:8080", "::1", 443, False),
    ("fd00::/8", "fd12::5", 443, True),
    ("192.168.1.5:80", "192.168.1.5", 80, True),
    ("192.168.1.5:80", "192.168.1.5", 443, False),
    ("", "example.com", 443, False),
    ("other.com corp.example", "x.corp.example", 443, True),  # space separated too
    ("1.2.3.4", "example.com", 443, False),
])
def test_no_proxy_matching(no_proxy: str, host: str, port: int, expected: bool) -> None:
    assert no_proxy_matches(no_proxy, host, port) is expected


def test_environment_selection_by_scheme_and_case() -> None:
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128",
           "HTTP_PROXY": "plain.corp:8080", "NO_PROXY": "internal.corp"}
    https = from_environment("https", "api.example.com", 443, env)
    assert https is not None and (https.host, https.port, https.origin) == (
        "lower", 3128, "https_proxy")  # lower case wins, as in curl
    http = from_environment("http", "api.example.com", 80, env)
    # No scheme and a port: accepted as curl does.
    assert http is not None and (http.host, http.port, http.origin) == (
        "plain.corp", 8080, "HTTP_PROXY")
    assert from_environment("https", "x.internal.corp", 443, env) is None
    # Only the variable of the URL's scheme counts.
    assert from_environment("https", "a.b", 443, {"HTTP_PROXY": "http://p:1"}) is None
    # A lower-case empty value switches the upper-case one off.
    assert from_environment("https", "a.b", 443, {"HTTPS_PROXY": "http://p:1",
                                                  "https_proxy": ""}) is None
    # no_proxy in lower case wins too.
    assert from_environment("https", "a.b", 443, {"HTTPS_PROXY": "http://p:1",
                                                  "NO_PROXY": "a.b", "no_proxy": "c.d"})
    assert from_environment("https", "a.b", 443, {"HTTPS_PROXY": "http://p:1",
                                                  "no_proxy": "*"}) is None
    port_default = from_environment("https", "a.b", 443, {"HTTPS_PROXY": "http://p"})
    assert port_default is not None and port_default.port == 80


def test_proxy_choice_setting_overrides_environment() -> None:
    env = {"HTTPS_PROXY": "http://env.corp:3128"}
    assert ProxyChoice("none", env).select("https", "api.example.com") is None
    assert ProxyChoice("NONE", env).select("https", "api.example.com") is None
    fixed = ProxyChoice("http://key.corp:8080", env).select("https", "api.example.com")
    # The key applies whatever NO_PROXY says (it is this webhook's explicit choice).
    assert fixed is not None and fixed.authority == "key.corp:8080"
    chosen = ProxyChoice(None, env).select_url("https://api.example.com/x")
    assert chosen is not None and chosen.authority == "env.corp:3128"
    assert ProxyChoice(None, {}).select_url("https://api.example.com/x") is None
    with pytest.raises(ValueError, match="HTTPS_PROXY is unusable: unsupported proxy "
                       "scheme socks5://"):
        ProxyChoice(None, {"HTTPS_PROXY": "socks5://s:1080"}).select("https", "a.b")


def test_proxy_url_credentials_are_decoded_and_redacted() -> None:
    proxy = parse_proxy_url("http://op%40corp:p%3Ass%2Fw0rd@proxy.corp:3128/")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "proxy.corp", 3128, "op@corp", "p:ss/w0rd")
    assert proxy.authorization == "Basic " + base64.b64encode(b"op@corp:p:ss/w0rd").decode()
    assert proxy.url == "http://proxy.corp:3128" and "w0rd" not in repr(proxy.authority)
    # Registered for the log redaction, decoded, encoded and as the Basic value.
    text = logs.redact(f"p:ss/w0rd p%3Ass%2Fw0rd {proxy.authorization}")
    assert "w0rd" not in text and proxy.authorization[6:] not in text
    token = parse_proxy_url("http://tok-98765@proxy.corp:3128")  # a token as user name
    assert token.authorization == "Basic " + base64.b64encode(b"tok-98765:").decode()
    assert "98765" not in logs.redact("user tok-98765")
    assert redact_proxy_url("http://op:secret@proxy.corp:3128") == (
        "http://op:***@proxy.corp:3128")
    assert redact_proxy_url("http://proxy.corp:3128") == "http://proxy.corp:3128"


@pytest.mark.parametrize(("value", "message"), [
    ("https://proxy.corp:3128", "https:// proxies (TLS to the proxy) are not supported"),
    ("socks5://proxy.corp:1080", "unsupported proxy scheme socks5://"),
    ("proxy.corp:3128", "unsupported proxy scheme"),
    ("http://proxy.corp", "the proxy URL has no port; write http://host:port"),
    ("http://:3128", "the proxy URL has no host"),
    ("http://proxy.corp:3128/path", "a proxy URL has no path or query"),
    ("http://proxy.corp:99999", "invalid proxy URL"),
])
def test_proxy_key_is_validated(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("webhooks:\n  - name: cloud\n    url: https://api.example.com/in\n"
                    f"    proxy: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    problem = str(caught.value)
    assert f"{path}:4:" in problem and "proxy" in problem and message in problem


def test_proxy_key_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("webhooks:\n"
                    "  - {name: a, url: 'https://x.example/in', proxy: None}\n"
                    "  - {name: b, url: 'https://x.example/in', proxy: 'http://u:p@h:3128'}\n"
                    "  - {name: c, url: 'https://x.example/in'}\n")
    config = load_config(str(path))
    assert [w.proxy for w in config.webhooks] == ["none", "http://u:p@h:3128", None]


# -- a real proxy ---------------------------------------------------------------------

class TestProxy:
    """An HTTP proxy on loopback: CONNECT tunnels and absolute-form forwarding, with an
    optional Basic credential requirement; records every request it was asked for."""

    __test__ = False  # not a test class for pytest

    def __init__(self, credentials: tuple[str, str] | None = None,
                 hosts: dict[str, str] | None = None) -> None:
        self.hosts = hosts or {}  # the proxy's own name resolution (the gateway has none)
        self.expected = None if credentials is None else "Basic " + base64.b64encode(
            f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self.connects: list[str] = []  # CONNECT targets that were tunnelled
        self.forwarded: list[str] = []  # absolute-form request lines relayed
        self.refused: list[str] = []  # request lines answered 407
        self.auth_seen: list[str | None] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()  # to close tunnels at stop
        self.port = 0

    async def start(self) -> TestProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()
            await self.server.wait_closed()

    @property
    def seen(self) -> int:
        return len(self.connects) + len(self.forwarded) + len(self.refused)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (f.partition(":") for f in fields if f)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                auth = headers.get("proxy-authorization")
                self.auth_seen.append(auth)
                if self.expected is not None and auth != self.expected:
                    self.refused.append(line)
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                 b"Proxy-Authenticate: Basic realm=\"corp\"\r\n"
                                 b"Content-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                method, target, _ = line.split(" ")
                if method == "CONNECT":
                    self.connects.append(target)
                    await self._tunnel(target, reader, writer)
                    return
                self.forwarded.append(line)
                await self._forward(method, target, fields, body, writer)
                return  # one request per forwarded connection (Connection: close)
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _tunnel(self, target: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host),
                                                             int(port))
        self.writers.add(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _forward(self, method: str, target: str, fields: list[str], body: bytes,
                       writer: asyncio.StreamWriter) -> None:
        rest = target.removeprefix("http://")
        authority, _, path = rest.partition("/")
        host, _, port = authority.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        kept = [f for f in fields if f and f.split(":", 1)[0].lower() not in (
            "proxy-authorization", "connection")]
        up_writer.write(f"{method} /{path} HTTP/1.1\r\n".encode() + "".join(
            f"{f}\r\n" for f in kept).encode() + b"Connection: close\r\n\r\n" + body)
        writer.write(await up_reader.read())  # until the server closes
        await writer.drain()
        up_writer.close()


# -- http1 through the proxy ----------------------------------------------------------

async def test_http1_tunnel_is_reused_and_keyed_by_route(certs: Certificates,
                                                         endpoint: Endpoint) -> None:
    proxy = await TestProxy().start()
    choice = ProxyChoice(None, {"https_proxy": f"http://127.0.0.1:{proxy.port}",
                                "no_proxy": "localhost"})
    pool = http1.ConnectionPool(2, 5.0, lambda: _client_context(certs), choice)
    try:
        for n in range(3):
            response = await pool.request("POST", f"{endpoint.url}/t?n={n}", {}, b"x%d" % n)
            assert response.status == 200
        # One tunnel carried all three (keep-alive through the tunnel).
        assert proxy.connects == [f"127.0.0.1:{endpoint.port}"]
        assert pool.connections_opened == 1
        # Same endpoint by a NO_PROXY name: direct, on its own connection.
        direct = await pool.request("POST", f"https://localhost:{endpoint.port}/d", {}, b"d")
        assert direct.status == 200 and proxy.connects == [f"127.0.0.1:{endpoint.port}"]
        assert pool.connections_opened == 2
        assert [(r.path, r.body, r.host) for r in endpoint.requests] == [
            ("/t", b"x0", f"127.0.0.1:{endpoint.port}"),
            ("/t", b"x1", f"127.0.0.1:{endpoint.port}"),
            ("/t", b"x2", f"127.0.0.1:{endpoint.port}"),
            ("/d", b"d", f"localhost:{endpoint.port}")]
    finally:
        await pool.close()
        await proxy.stop()


async def test_http1_tunnel_tls_is_with_the_endpoint_by_name(certs: Certificates) -> None:
    """Through the tunnel, SNI and the certificate check use the endpoint's name (which
    only the proxy can resolve here): its certificate names api.example.test only."""
    named = certs.ca.issue_cert("api.example.test")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    named.configure_cert(server_context)
    sni: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore
    server = await Endpoint(ssl_context=server_context).start()
    proxy = await TestProxy(hosts={"api.example.test": "127.0.0.1"}).start()
    pool = http1.ConnectionPool(1, 5.0, lambda: _client_context(certs),
                                ProxyChoice(f"http://127.0.0.1:{proxy.port}"))
    try:
        url = f"https://api.example.test:{server.port}/named"
        response = await pool.request("POST", url, {"X-N": "1"}, b'{"n": 1}')
        assert response.status == 200 and response.body == b"ok"
        assert sni == ["api.example.test"]
        assert proxy.connects == [f"api.example.test:{server.port}"]
        [received] = server.requests
        assert (received.path, received.body, received.host, received.headers["X-N"]) == (
            "/named", b'{"n": 1}', f"api.example.test:{server.port}", "1")
        assert "Proxy-Authorization" not in received.headers
    finally:
        await pool.close()
        await proxy.stop()
        await server.stop()


async def test_http1_tunnel_verifies_the_endpoint_certificate(certs: Certificates,
                                                              endpoint: Endpoint) -> None:
    """The TLS inside the tunnel is checked against the endpoint, not the proxy: an
    untrusted endpoint certificate fails as TLS, not as a proxy error."""
    proxy = await TestProxy().start()
    pool = http1.ConnectionPool(1, 5.0, None,  # system CAs: the trustme CA is unknown
                                ProxyChoice(f"http://127.0.0.1:{proxy.port}"))
    try:
        with pytest.raises(Exception) as caught:
            await pool.request("POST", f"{endpoint.url}/t", {}, b"x")
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert proxy.connects == [f"127.0.0.1:{endpoint.port}"] and not endpoint.requests
    finally:
        await pool.close()
        await proxy.stop()


async def test_http1_proxy_failures_are_plain(certs: Certificates, endpoint: Endpoint
                                              ) -> None:
    proxy = await TestProxy(("op", "right")).start()
    closed = await TestProxy().start()
    closed_port = closed.port
    await closed.stop()  # nothing listens there now
    try:
        cases = [
            (f"http://op:wrong@127.0.0.1:{proxy.port}", endpoint.url,
             f"proxy authentication required (407) at 127.0.0.1:{proxy.port}"),
            (f"http://127.0.0.1:{proxy.port}", endpoint.url,
             f"proxy authentication required (407) at 127.0.0.1:{proxy.port}; put"
             " user:password in the proxy URL"),
            # Plain http: the 407 arrives as the response to the absolute-form request.
            (f"http://op:wrong@127.0.0.1:{proxy.port}", "http://127.0.0.1:9",
             f"proxy authentication required (407) at 127.0.0.1:{proxy.port}"),
            (f"http://127.0.0.1:{closed_port}", endpoint.url,
             f"proxy connect failed: cannot connect to 127.0.0.1:{closed_port} (from"
             " proxy): ConnectionRefusedError"),
        ]
        for setting, url, message in cases:
            pool = http1.ConnectionPool(1, 5.0, lambda: _client_context(certs),
                                        ProxyChoice(setting))
            try:
                with pytest.raises(http1.ProxyError) as caught:
                    await pool.request("POST", url + "/t", {}, b"x")
                assert str(caught.value).startswith(message), str(caught.value)
                assert "wrong" not in str(caught.value)
                assert caught.value.config_problem is ("407" in message)
            finally:
                await pool.close()
        # A proxy name that does not resolve (the text may say "in time" if DNS hangs).
        pool = http1.ConnectionPool(1, 5.0, lambda: _client_context(certs),
                                    ProxyChoice(None, {"HTTPS_PROXY": "proxy.invalid:3128"}))
        try:
            with pytest.raises(http1.ProxyError) as caught:
                await pool.request("POST", endpoint.url + "/t", {}, b"x")
            assert str(caught.value).startswith("proxy connect failed: "), str(caught.value)
            assert "proxy.invalid:3128" in str(caught.value)
        finally:
            await pool.close()
        assert not endpoint.requests
    finally:
        await proxy.stop()


def _client_context(certs: Certificates) -> Any:
    context = ssl.create_default_context()
    certs.ca.configure_trust(context)
    return context


# -- the daemon through the proxy -----------------------------------------------------

def _status(daemon: Daemon) -> dict[str, dict[str, Any]]:
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return {w["name"]: w for w in json.loads(result.stdout)["webhooks"]}


async def _status_async(daemon: Daemon) -> dict[str, dict[str, Any]]:
    # The proxy and endpoints live in this event loop: never block it on a subprocess.
    return await asyncio.to_thread(_status, daemon)


async def test_environment_proxy_no_proxy_and_none(
        tmp_path: Path, mosquitto: Mosquitto, certs: Certificates, endpoint: Endpoint
) -> None:
    """HTTPS_PROXY carries webhook "viaenv" (and its OAuth2 token request) through one
    CONNECT tunnel each; "noproxy" (a NO_PROXY host) and "direct" (``proxy: none``) reach
    the other endpoint without the proxy seeing anything of them."""
    proxy = await TestProxy().start()
    other = await Endpoint(ssl_context=certs.server_context()).start()
    endpoint.responder = lambda r: (
        web.json_response({"access_token": "tok-123456", "expires_in": 3600})
        if r.path == "/token" else web.Response(status=200))
    webhooks = [
        https_webhook("viaenv", endpoint, certs, "/env", concurrency=1, auth={
            "type": "oauth2", "token_url": f"{endpoint.url}/token", "client_id": "gw",
            "client_secret": "client-secret-42"}),
        https_webhook("noproxy", other, certs, "/noproxy", concurrency=1,
                      url=f"https://localhost:{other.port}/noproxy"),
        https_webhook("direct", other, certs, "/direct", concurrency=1, proxy="none"),
    ]
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": "example.com,localhost"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, webhooks), env=env).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        for n in range(3):
            publisher.publish("devices/d1/telemetry", {"seq": n})
        await wait_for(lambda: len([r for r in endpoint.requests if r.path == "/env"]) == 3
                       and len(other.requests) == 6, 20, "all deliveries")
        sent = [r for r in endpoint.requests if r.path == "/env"]
        assert [r.json()["payload"] for r in sent] == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
        assert {r.headers["Authorization"] for r in sent} == {"Bearer tok-123456"}
        # The token request (aiohttp) and the webhook pool (http1) each opened one tunnel,
        # to the endpoint's authority; nothing of the other endpoint passed the proxy.
        assert proxy.connects == [f"127.0.0.1:{endpoint.port}"] * 2
        assert proxy.forwarded == [] and proxy.refused == []
        assert [r.path for r in endpoint.requests].count("/token") == 1
        assert sorted(r.path for r in other.requests) == ["/direct"] * 3 + ["/noproxy"] * 3
        # `webhook-bridge test` takes the same path and says so.
        result = await asyncio.to_thread(daemon.cli, "test", "viaenv")
        assert result.returncode == 0, result.stdout + result.stderr
        assert (f"(through proxy 127.0.0.1:{proxy.port} (CONNECT tunnel, from HTTPS_PROXY))"
                in result.stdout)
        assert len(proxy.connects) == 4  # its own token request and request
        result = await asyncio.to_thread(daemon.cli, "test", "direct")
        assert result.returncode == 0 and "through proxy" not in result.stdout
        assert len(proxy.connects) == 4
    finally:
        publisher.close()
        daemon.terminate()
        await other.stop()
        await proxy.stop()


async def test_webhook_proxy_with_credentials_and_407(
        tmp_path: Path, mosquitto: Mosquitto, certs: Certificates, endpoint: Endpoint
) -> None:
    """A per-webhook proxy with credentials (https through CONNECT and http through an
    absolute-form request), the credentials in neither the log nor ``status``; wrong ones
    give a plain 407 in ``status``."""
    proxy = await TestProxy(("gateway", "Pr0xy:s3cret/1")).start()
    plain = await Endpoint().start()
    closed = await TestProxy().start()
    closed_port = closed.port
    await closed.stop()  # nothing listens there now
    good = f"http://gateway:Pr0xy%3As3cret%2F1@127.0.0.1:{proxy.port}"
    bad = f"http://gateway:Wr0ng-s3cret@127.0.0.1:{proxy.port}"
    webhooks = [
        https_webhook("tunnel", endpoint, certs, "/tunnel", proxy=good),
        {"name": "plain", "url": f"{plain.url}/plain", "allow_insecure_http": True,
         "proxy": good, "retry": {"initial": "100ms", "max": "1s"}},
        https_webhook("denied", endpoint, certs, "/denied", proxy=bad),
        https_webhook("unreachable", endpoint, certs, "/unreachable",
                      proxy=f"http://gateway:Pr0xy%3As3cret%2F1@127.0.0.1:{closed_port}"),
    ]
    # The environment says direct for everything: the key wins.
    env = {"NO_PROXY": "*", "HTTPS_PROXY": "http://127.0.0.1:9"}
    daemon = Daemon(tmp_path, base_config(tmp_path, mosquitto, webhooks), env=env).start()
    publisher = Publisher(mosquitto.port)
    try:
        await started(daemon)
        publisher.publish("devices/d7/telemetry", {"seq": 7})
        await wait_for(lambda: len(endpoint.requests) == 1 and len(plain.requests) == 1
                       and len(proxy.refused) >= 2, 20, "deliveries and a refusal")
        assert [(r.path, r.json()["payload"]) for r in endpoint.requests] == [
            ("/tunnel", {"seq": 7})]
        assert plain.requests[0].json()["payload"] == {"seq": 7}
        assert "Proxy-Authorization" not in plain.requests[0].headers
        assert proxy.connects == [f"127.0.0.1:{endpoint.port}"]
        assert proxy.forwarded == [f"POST http://127.0.0.1:{plain.port}/plain HTTP/1.1"]
        assert set(proxy.refused) == {f"CONNECT 127.0.0.1:{endpoint.port} HTTP/1.1"}

        async def errors() -> dict[str, str]:
            return {name: row.get("last_error") or "" for name, row in
                    (await _status_async(daemon)).items()}

        denied = f"proxy authentication required (407) at 127.0.0.1:{proxy.port}"
        unreachable = (f"proxy connect failed: cannot connect to 127.0.0.1:{closed_port}"
                       " (from proxy): ConnectionRefusedError")
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            shown = await errors()
            if shown["denied"] == denied and shown["unreachable"].startswith(unreachable):
                break
            assert asyncio.get_running_loop().time() < deadline, shown
            await asyncio.sleep(0.1)
        statuses = await _status_async(daemon)
        assert statuses["denied"]["delivered"] == statuses["unreachable"]["delivered"] == 0
        # A 407 is a configuration problem and counts towards failure_limit; an
        # unreachable proxy is like an offline network and does not.
        assert statuses["denied"]["consecutive_failures"] >= 1
        assert statuses["unreachable"]["consecutive_failures"] == 0
        assert statuses["unreachable"]["attempts"] >= 1
        table = (await asyncio.to_thread(daemon.cli, "status")).stdout
        dumped = json.dumps(statuses) + table + daemon.output()
        for secret in ("Pr0xy:s3cret/1", "Pr0xy%3As3cret%2F1", "Wr0ng-s3cret",
                       base64.b64encode(b"gateway:Pr0xy:s3cret/1").decode()):
            assert secret not in dumped
    finally:
        publisher.close()
        daemon.terminate()
        await plain.stop()
        await proxy.stop()


def test_cli_test_shows_407_plainly(tmp_path: Path) -> None:
    """`webhook-bridge test` with wrong proxy credentials: a plain 407 line, exit 1."""
    async def scenario() -> tuple[Any, TestProxy]:
        proxy = await TestProxy(("op", "right-one")).start()
        (tmp_path / "config.yaml").write_text(
            "store: {path: " + str(tmp_path / "q.db") + "}\n"
            "webhooks:\n  - name: cloud\n    url: https://api.example.com/in\n"
            f"    proxy: http://op:wrong-one@127.0.0.1:{proxy.port}\n")
        try:
            result = await asyncio.to_thread(run_cli, "test", "cloud", "-c",
                                             str(tmp_path / "config.yaml"))
        finally:
            await proxy.stop()
        return result, proxy

    result, proxy = asyncio.run(scenario())
    assert result.returncode == 1
    assert ("no response" in result.stdout and f"proxy authentication required (407) at"
            f" 127.0.0.1:{proxy.port}" in result.stdout), result.stdout
    assert "wrong-one" not in result.stdout + result.stderr
    assert proxy.refused == ["CONNECT api.example.com:443 HTTP/1.1"]


def test_proxy_failures_and_failure_limit() -> None:
    """A 407 (or another 4xx to CONNECT) counts towards failure_limit, like a TLS
    failure; an unreachable proxy or a 5xx does not, like an offline network."""
    proxy = parse_proxy_url("http://proxy.corp:3128")
    auth = classify_exception(http1.ProxyAuthError(proxy))
    assert (auth.kind, auth.cause, auth.counts_as_failure) == (
        "retry", "proxy authentication required (407) at proxy.corp:3128; put user:password"
        " in the proxy URL", True)
    down = classify_exception(http1.ProxyError("proxy connect failed: x"))
    assert (down.kind, down.cause, down.counts_as_failure) == (
        "retry", "proxy connect failed: x", False)
    policy = classify_exception(http1.ProxyError("proxy connect failed: y", True))
    assert (policy.kind, policy.counts_as_failure) == ("retry", True)


def test_api_json_redacts_the_proxy_password() -> None:
    webhook = WebhookConfig(name="cloud", url="https://api.example.com/in",
                            proxy="http://gateway:s3cret-pw@proxy.corp:3128")
    shown = admin.redact(dump_webhook(webhook))
    assert shown["proxy"] == "http://gateway:***@proxy.corp:3128"
    # A GET body sent back with PUT keeps the real password ...
    back = admin.unredact(dict(shown), dump_webhook(webhook))
    assert back["proxy"] == "http://gateway:s3cret-pw@proxy.corp:3128"
    # ... and a changed proxy is taken as given.
    changed = admin.unredact({**shown, "proxy": "http://other:pw2@p:1"}, dump_webhook(webhook))
    assert changed["proxy"] == "http://other:pw2@p:1"


@pytest.mark.parametrize("value", [
    "none", "None", "http://proxy.corp:3128", "http://u:p%40ss@proxy.corp:3128/",
    "http://gateway:${PROXY_PASSWORD}@proxy.corp:3128", "http://[fd00::1]:3128",
    "https://proxy.corp:3128", "http://proxy.corp", "proxy.corp:3128", "socks5://s:1080",
    "nonesuch", "http://proxy.corp:3128/path",
])
def test_schema_and_check_agree_on_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         value: str) -> None:
    import jsonschema
    import yaml

    monkeypatch.setenv("PROXY_PASSWORD", "pw-from-env")
    text = ("webhooks:\n  - name: cloud\n    url: https://api.example.com/in\n"
            f"    proxy: {json.dumps(value)}\n")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    try:
        load_config(str(path))
        accepted = True
    except ConfigError:
        accepted = False
    schema = json.loads((Path(__file__).parent.parent / "config" / "schema.json").read_text())
    valid = jsonschema.Draft7Validator(schema).is_valid(yaml.safe_load(text))
    assert accepted is valid
