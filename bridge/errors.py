"""Owns the exceptions that cross module boundaries without dragging a stage along.

``webhook-bridge status`` and the other store commands import these to report failures;
keeping them here means those commands never load the daemon, the delivery stack
(:mod:`bridge.delivery`, :mod:`bridge.http1`, aiohttp) or the dispatcher.
"""

from __future__ import annotations


class StartError(Exception):
    """The bridge cannot start (reported as one line, exit 1)."""


class ChangeError(Exception):
    """A live change (reload, conf.d edit, API write) could not be applied in full; the
    running configuration is unchanged. ``problems`` are one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
