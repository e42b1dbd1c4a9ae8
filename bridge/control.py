"""Owns the interface between the admin server and the running bridge.

:mod:`bridge.admin` (and any other HTTP module) sees the daemon only through
:class:`BridgeControl`: the running config, the store, the metrics, readiness, and the
few actions an operator may take. So the admin server never imports the daemon, and the
daemon imports the admin server only when ``admin.listen`` is set.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .config import Config
    from .delivery import Outcome
    from .events import Event
    from .metrics import Metrics
    from .store import Store


class BridgeControl(Protocol):
    """What the admin server may read and do."""

    config: Config  # replaced by every applied change: re-read it, do not keep it
    store: Store
    metrics: Metrics

    @property
    def ready(self) -> bool:
        """Connected to the broker and the store writable (``/readyz``)."""

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def failed_change(self) -> dict[str, Any] | None:
        """The last live change that could not be applied (until a good one), or None."""

    async def reload(self, why: str = "changed via API",
                     undo: Callable[[], Awaitable[None]] | None = None) -> None:
        """Re-read the configuration and apply it atomically; raise
        :class:`~bridge.config.ConfigError` or :class:`~bridge.errors.ChangeError`, run
        ``undo`` and change nothing when it cannot be applied in full."""

    async def refuse_change(self, why: str, problems: list[str]) -> None:
        """Record a change refused before it reached the configuration (log line,
        ``status``, ``/readyz``), as :meth:`reload` records one that failed."""

    async def set_webhook_state(self, name: str, state: str,
                                reason: str = "changed via API") -> None:
        """Write a webhook's state through the store's one ordered path and apply it."""

    async def test_send(self, name: str, event: Event) -> Outcome:
        """Send ``event`` through webhook ``name`` now, outside the queue."""
