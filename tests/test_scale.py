"""Issue 7: scale-out with MQTT 5 shared subscriptions. Two bridges in one group against
a real Mosquitto split the stream, and together deliver every message."""

from __future__ import annotations

import json
from pathlib import Path

from .support import (
    Certificates,
    Daemon,
    Endpoint,
    Mosquitto,
    Publisher,
    base_config,
    https_webhook,
    seqs,
    started,
    wait_for,
)


async def test_two_bridges_in_a_shared_group_split_the_stream(
        tmp_path: Path, mosquitto: Mosquitto, endpoint: Endpoint, certs: Certificates) -> None:
    daemons = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        config = base_config(workdir, mosquitto, [https_webhook("cloud", endpoint, certs)],
                             shared_group="bridges", protocol=5)
        daemons.append(Daemon(workdir, config).start())
    publisher = Publisher(mosquitto.port)
    try:
        for daemon in daemons:
            await started(daemon)
        await publisher.publish_all([("devices/d1/telemetry", {"seq": n})
                                     for n in range(10_000)])
        await wait_for(lambda: set(seqs(endpoint.requests)) == set(range(10_000)), 120,
                       "all 10,000 messages")
        shares: list[int] = []

        def delivered() -> bool:
            # A delivered mark rides with the next commit (within store.commit_window),
            # so the counters may trail the endpoint by up to a window.
            shares[:] = [json.loads(daemon.cli("status", "--json").stdout)["webhooks"][0]
                         ["delivered"] for daemon in daemons]
            return sum(shares) >= len(endpoint.requests)

        await wait_for(delivered, 30, "the delivered counters", interval=0.2)
        assert sum(shares) == len(endpoint.requests)
        assert sum(shares) >= 10_000
        assert min(shares) >= 2_000, shares  # each bridge takes a real share
        for daemon in daemons:
            assert daemon.terminate() == 0
    finally:
        publisher.close()
