"""Fixtures: a Mosquitto per test, a trustme CA, HTTPS endpoints that record requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .support import Certificates, Endpoint, Mosquitto


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
