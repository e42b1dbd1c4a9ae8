"""Delivery: one HTTP attempt for one webhook, and what its outcome means.

Owns the connection pool of each webhook (:mod:`bridge.http1`: keep-alive, sized to its
``concurrency``, TLS and mTLS, redirects never followed), the headers of SPEC §4
(``webhook-id``, ``webhook-timestamp``, ``User-Agent``), auth (basic, bearer, header,
OAuth2 client credentials with a cached token, fetched with aiohttp), signing, and the
classification of a response or an exception into delivered / retry / dead / gone. When
to attempt is :mod:`bridge.dispatch`'s business; what to send is :mod:`bridge.render`'s.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import __version__, http1, logs
from .config import TLSConfig, WebhookConfig
from .policy import DEAD, DELIVERED, GONE, RETRY, parse_retry_after
from .proxy import ProxyChoice
from .render import Request
from .signing import SecretKeeper, signature_headers

if TYPE_CHECKING:  # aiohttp's client is loaded only for OAuth2 token requests (~17 MB RSS)
    import aiohttp

USER_AGENT = f"webhook-bridge/{__version__}"
EXCERPT = http1.EXCERPT
RETRYABLE_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))



@dataclass(slots=True)
class Outcome:
    kind: str  # delivered | retry | dead | gone
    status: int | None = None
    cause: str = ""
    retry_after: float | None = None
    counts_as_failure: bool = False  # towards failure_limit
    response: str | None = None  # body excerpt, for dead letters and `test`
    headers: dict[str, str] | None = None
    elapsed: float = 0.0


def _header(headers: dict[str, str], name: str) -> str | None:
    """A header by name in any case (:class:`http1.Headers` ignores case itself; a plain
    dict from elsewhere may hold ``retry-after`` or ``Retry-After``)."""
    value = headers.get(name)
    if value is None and not isinstance(headers, http1.Headers):
        key = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == key), None)
    return value


def classify_response(status: int, headers: dict[str, str], excerpt: str) -> Outcome:
    if 200 <= status < 300:
        return Outcome(DELIVERED, status)
    if (_header(headers, "webhook-delivery") or "").strip().lower() == "abort-message":
        return Outcome(DEAD, status, f"HTTP {status} with webhook-delivery: abort-message",
                       counts_as_failure=True, response=excerpt)
    if status == 410:
        return Outcome(GONE, status, "HTTP 410 Gone: the endpoint asked to stop",
                       counts_as_failure=True, response=excerpt)
    if status in RETRYABLE_STATUSES:
        retry_after = parse_retry_after(_header(headers, "Retry-After")) \
            if status in (429, 503) else None
        return Outcome(RETRY, status, f"HTTP {status}", retry_after=retry_after,
                       counts_as_failure=status != 429, response=excerpt)
    if 300 <= status < 400:
        location = _header(headers, "Location") or "?"
        return Outcome(DEAD, status, f"HTTP {status} redirect to {location} not followed; "
                       "put the final URL in the webhook", counts_as_failure=True,
                       response=excerpt)
    return Outcome(DEAD, status, f"HTTP {status}", counts_as_failure=True, response=excerpt)


def classify_exception(exc: BaseException) -> Outcome:
    """Timeouts and connection errors are retried; they never count towards
    ``failure_limit`` (the gateway may simply be offline), except TLS failures, which
    mean the endpoint is misconfigured and will not heal by waiting."""
    if isinstance(exc, ssl.SSLError):
        return Outcome(RETRY, None, f"TLS failure: {_describe(exc)}", counts_as_failure=True)
    if isinstance(exc, asyncio.TimeoutError):
        return Outcome(RETRY, None, "timed out")
    if isinstance(exc, http1.ProxyError):
        # A 407 or another 4xx from the proxy is a configuration problem (credentials,
        # proxy policy) that waiting will not fix: it counts, as a TLS failure does.
        # An unreachable proxy is like an unreachable network: it does not.
        return Outcome(RETRY, None, str(exc), counts_as_failure=exc.config_problem)
    if isinstance(exc, http1.HTTPClientError):
        return Outcome(RETRY, None, f"connection failed: {exc}")
    # The OAuth2 token request goes through aiohttp (when it is loaded at all).
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
            return Outcome(RETRY, None, f"TLS failure: {_describe(exc)}",
                           counts_as_failure=True)
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return Outcome(RETRY, None, "timed out")
        if isinstance(exc, aiohttp.ClientError):
            return Outcome(RETRY, None, f"connection failed: {_describe(exc)}")
    if isinstance(exc, OSError):
        return Outcome(RETRY, None, f"connection failed: {_describe(exc)}")
    return Outcome(RETRY, None, f"unexpected error: {_describe(exc)}")


_describe = http1.describe


def ssl_context(tls: TLSConfig | None) -> ssl.SSLContext:
    """Verified TLS by default; see :meth:`TLSConfig.client_context`."""
    return tls.client_context() if tls is not None else ssl.create_default_context()


class OAuth2Token:
    """OAuth2 client credentials: one token request, cached until shortly before expiry."""

    def __init__(self, webhook: WebhookConfig,
                 session: aiohttp.ClientSession | None = None,
                 proxy: ProxyChoice | None = None) -> None:
        self.auth = webhook.auth
        self.proxy = proxy if proxy is not None else ProxyChoice(webhook.proxy)
        self.tls = webhook.tls
        self.session = session  # opened at the first fetch, unless given
        self.timeout = webhook.timeout
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    def invalidate(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def get(self) -> str:
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires:
                return self._token
            form = {"grant_type": "client_credentials", "client_id": self.auth.client_id or "",
                    "client_secret": self.auth.client_secret or ""}
            if self.auth.scope:
                form["scope"] = self.auth.scope
            self.fetches += 1
            if self.session is None:
                import aiohttp

                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1, ssl=ssl_context(self.tls)),
                    cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=("User-Agent",))
            import aiohttp

            url = self.auth.token_url or ""
            try:
                proxy = self.proxy.select_url(url)
            except ValueError as error:  # an unusable HTTPS_PROXY
                raise http1.ProxyError(f"proxy misconfigured: {error}", config_problem=True
                                       ) from None
            via: dict[str, object] = {}
            if proxy is not None:
                # aiohttp tunnels https with CONNECT; the credentials go as proxy_auth so the
                # URL it may put in an error text has none.
                via["proxy"] = proxy.url
                if proxy.username is not None:
                    via["proxy_auth"] = aiohttp.BasicAuth(proxy.username, proxy.password or "")
            try:
                async with self.session.post(url, data=form, allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             **via) as response:  # type: ignore[arg-type]
                    if response.status == 407 and proxy is not None:  # plain http via proxy
                        raise http1.ProxyAuthError(proxy)
                    if response.status != 200:
                        raise TokenError(f"token endpoint answered HTTP {response.status}",
                                         response.status)
                    data = await response.json(content_type=None)
            except aiohttp.ClientHttpProxyError as exc:  # the proxy refused CONNECT
                assert proxy is not None
                if exc.status == 407:
                    raise http1.ProxyAuthError(proxy) from None
                raise http1.ProxyError(
                    f"proxy connect failed: {proxy.authority} answered {exc.status} to CONNECT"
                    f" for the token URL", config_problem=400 <= exc.status < 500) from None
            except aiohttp.ClientProxyConnectionError as exc:
                assert proxy is not None
                raise http1.ProxyError(f"proxy connect failed: cannot connect to"
                                       f" {proxy.authority} (from {proxy.origin}):"
                                       f" {_describe(exc.os_error)}") from None
            token = data.get("access_token") if isinstance(data, dict) else None
            if not isinstance(token, str) or not token:
                raise TokenError("token endpoint answered without an access_token", None)
            lifetime = float(data.get("expires_in") or 3600)
            logs.register_rotating(f"oauth2:{self.auth.token_url}:{self.auth.client_id}", token)
            self._token = token
            self._expires = time.monotonic() + max(lifetime - min(30.0, lifetime / 10), 1.0)
            return token

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class TokenError(Exception):
    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class Sender:
    """Sends requests for one webhook over its own keep-alive connection pool."""

    def __init__(self, webhook: WebhookConfig, secrets: SecretKeeper | None = None) -> None:
        self.webhook = webhook
        self.secrets = secrets
        self.pool: http1.ConnectionPool | None = None
        self.oauth2: OAuth2Token | None = None
        self._auth_headers: dict[str, str] | None = None
        self._signing_keys: list[str] = []

    async def start(self) -> None:
        self.start_nowait()

    def start_nowait(self) -> None:
        """Open the connection pool (inside a running event loop)."""
        webhook = self.webhook
        tls = webhook.tls
        proxy = ProxyChoice(webhook.proxy)
        self.pool = http1.ConnectionPool(max(webhook.concurrency, 1) + 1, webhook.timeout,
                                         lambda: ssl_context(tls), proxy)
        if webhook.url.lower().startswith("https:"):
            # Now, not at the first request: a bad CA or key file fails the start.
            self.pool.tls_context()
        if webhook.auth.type == "oauth2":
            self.oauth2 = OAuth2Token(webhook, proxy=proxy)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.oauth2 is not None:
            await self.oauth2.close()

    def static_auth_headers(self) -> dict[str, str]:
        if self._auth_headers is None:
            self._auth_headers = self._make_auth_headers()
        return self._auth_headers

    def _make_auth_headers(self) -> dict[str, str]:
        auth = self.webhook.auth
        if auth.type == "basic":
            pair = f"{auth.username}:{auth.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        if auth.type == "bearer":
            return {"Authorization": f"Bearer {auth.token}"}
        if auth.type == "header":
            return {auth.name: auth.value or ""}
        return {}

    def final_headers(self, request: Request, msg_id: str, timestamp: int) -> dict[str, str]:
        """The request's headers plus ids, auth and signature, in sending order."""
        headers = dict(request.headers)
        headers["webhook-id"] = msg_id
        headers["webhook-timestamp"] = str(timestamp)
        auth = self._auth_headers
        if auth is None:
            auth = self.static_auth_headers()
        if auth:
            headers.update(auth)
        signing = self.webhook.signing
        if signing is not None and self.secrets is not None:
            keys = self.secrets.secrets_for(self.webhook.name, signing.secret)
            if keys != self._signing_keys:  # generated or rotated ones are not in the config
                self._signing_keys = keys
                logs.register_secrets(f for key in keys for f in logs.signing_forms(key))
            headers.update(signature_headers(signing.scheme, signing.header, keys, msg_id,
                                             timestamp, request.body))
        return headers

    async def send(self, request: Request, msg_id: str) -> Outcome:
        """One attempt (plus one immediate retry with a fresh OAuth2 token after a 401)."""
        assert self.pool is not None, "Sender.start() first"
        started = time.monotonic()
        try:
            outcome = await self._send_once(request, msg_id)
        except TokenError as exc:
            outcome = _token_outcome(exc)
        except Exception as exc:
            outcome = classify_exception(exc)
        outcome.elapsed = time.monotonic() - started
        if outcome.kind == DELIVERED and not outcome.response and not outcome.cause:
            return outcome  # nothing to redact (a delivery's headers are not kept)
        return redact_outcome(outcome)

    async def _send_once(self, request: Request, msg_id: str, refreshed: bool = False
                         ) -> Outcome:
        assert self.pool is not None
        headers = self.final_headers(request, msg_id, int(time.time()))
        token = None
        if self.oauth2 is not None:
            token = await self.oauth2.get()
            headers["Authorization"] = f"Bearer {token}"
        response = await self.pool.request(request.method, request.url, headers,
                                            request.body)
        status = response.status
        if status == 401 and token is not None and not refreshed and self.oauth2 is not None:
            self.oauth2.invalidate(token)
            return await self._send_once(request, msg_id, refreshed=True)
        excerpt = response.text() if response.body else ""  # most answers have no body
        if 200 <= status < 300:  # as classify_response says, without its call
            return Outcome(DELIVERED, status, response=excerpt, headers=response.headers)
        outcome = classify_response(status, response.headers, excerpt)
        outcome.headers = response.headers
        if outcome.response is None:
            outcome.response = excerpt
        return outcome


def redact_outcome(outcome: Outcome) -> Outcome:
    """``outcome`` with every registered secret taken out of the text the endpoint sent
    (an endpoint may echo the request's credentials), before anything stores, logs or
    shows it."""
    if outcome.response:
        outcome.response = logs.redact_excerpt(outcome.response)
    if outcome.cause:
        outcome.cause = logs.redact(outcome.cause)
    if outcome.headers and outcome.kind != DELIVERED:
        headers = http1.Headers()
        for name, value in outcome.headers.items():
            headers.add(logs.redact(name), logs.redact(value))
        outcome.headers = headers
    return outcome


def _token_outcome(exc: TokenError) -> Outcome:
    status = exc.status
    if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUSES:
        return Outcome(RETRY, status, f"OAuth2 {exc}", counts_as_failure=True)
    return Outcome(RETRY, status, f"OAuth2 {exc}", counts_as_failure=status is not None
                   and status != 429)
