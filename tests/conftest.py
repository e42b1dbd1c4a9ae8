"""Fixtures: a Mosquitto per test, a trustme CA, HTTPS endpoints that record requests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .support import Certificates, Endpoint, Mosquitto

# The machine's own proxy settings must not route the tests' loopback traffic (the daemon
# honours them, and curl's rule, which we follow, does not exempt loopback). The proxy
# tests set them explicitly where they want them.
for _name in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def endpoint(certs: Certificates) -> AsyncIterator[Endpoint]:
    server = await Endpoint(ssl_context=certs.server_context()).start()
    yield server
    await server.stop()
