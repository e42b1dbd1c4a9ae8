"""Owns the one-off test request: what ``webhook-bridge test`` and ``POST
/api/v1/webhooks/{name}/test`` send, built and sent by the same two functions.

The request is rendered as the queue would send it (a batching webhook gets a one-event
batch with a ``bat_`` id, like a real batch) and its headers are fixed once, so the
request a command prints is byte for byte, signature included, the one sent. Nothing here
touches the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import WebhookConfig
from .delivery import USER_AGENT, Outcome, Sender, classify_exception
from .events import Event, new_id
from .render import Renderer, Request
from .signing import SecretKeeper


class _PinnedSender(Sender):
    """A Sender whose headers carry one fixed timestamp (the one already shown)."""

    def __init__(self, webhook: WebhookConfig, secrets: SecretKeeper | None,
                 timestamp: int) -> None:
        super().__init__(webhook, secrets)
        self.timestamp = timestamp

    def final_headers(self, request: Request, msg_id: str, timestamp: int) -> dict[str, str]:
        return super().final_headers(request, msg_id, self.timestamp)


@dataclass(slots=True)
class TestSend:
    """A rendered test request: what goes out, under which ``webhook-id``."""

    __test__ = False  # not a pytest test class

    webhook: WebhookConfig
    request: Request
    msg_id: str
    headers: dict[str, str]
    sender: Sender


def prepare(webhook: WebhookConfig, event: Event, secrets: SecretKeeper | None,
            now: float | None = None) -> TestSend:
    """Render ``event`` for ``webhook`` and sign it. Raises
    :class:`~bridge.render.RenderError`, or a secret-store error when signing fails."""
    batch_id = new_id("bat_") if webhook.batch is not None else None
    request = Renderer(webhook, USER_AGENT).render([event], batch_id)
    msg_id = batch_id or event.id
    sender = _PinnedSender(webhook, secrets, int(time.time() if now is None else now))
    headers = sender.final_headers(request, msg_id, sender.timestamp)
    return TestSend(webhook, request, msg_id, headers, sender)


async def send(test: TestSend) -> Outcome:
    """Send the prepared request once, over its own connection (outside the queue)."""
    try:
        await test.sender.start()
    except Exception as exc:  # a TLS file that does not load: shown like a send failure
        return classify_exception(exc)
    try:
        return await test.sender.send(test.request, test.msg_id)
    finally:
        await test.sender.close()
