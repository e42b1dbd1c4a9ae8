"""Matching: which webhooks want an event (sources, events, channel, fleets, tags, filter).

Owns the compiled form of each webhook's selection and the one question asked of it per
event. ``invalid`` events go only to webhooks that list that type by name: a glob such as
``*`` never sends undecodable payloads to an endpoint that did not ask for them. The
registry's lifecycle events (``device.created`` and friends, which no message carries)
go only to webhooks whose ``events`` ask for them, so a plain telemetry webhook receives
what its devices publish and nothing more.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import jmespath

from .config import WebhookConfig
from .events import INVALID, Event

OPT_IN = frozenset({"device.created", "device.first_registration", "device.deregistration",
                    "device.deleted"})


class Rule:
    """A webhook's selection, compiled once per configuration."""

    def __init__(self, webhook: WebhookConfig) -> None:
        self.name = webhook.name
        self.sources = frozenset(webhook.sources) if webhook.sources is not None else None
        self.events = (
            re.compile("|".join(fnmatch.translate(g) for g in webhook.events))
            if webhook.events is not None else None
        )
        self.type_names = tuple(webhook.events or ())
        self.wants_invalid = webhook.events is not None and INVALID in webhook.events
        self.channel = webhook.channel
        self.fleets = frozenset(webhook.fleets) if webhook.fleets is not None else None
        self.tags = frozenset(webhook.tags) if webhook.tags is not None else None
        self.filter = jmespath.compile(webhook.filter) if webhook.filter else None
        # Whether the answer depends on the event's source and type alone.
        self.by_type_only = (self.channel is None and self.fleets is None
                             and self.tags is None and self.filter is None)

    def matches(self, event: Event, envelope: dict[str, Any] | None = None) -> bool:
        if self.sources is not None and event.source not in self.sources:
            return False
        if event.type == INVALID:
            if not self.wants_invalid:
                return False
        elif self.events is None:
            if event.type in OPT_IN:
                return False
        elif not self.events.match(event.type):
            return False
        if self.channel is not None:
            payload = event.payload
            if not isinstance(payload, dict) or payload.get("webhook_channel") != self.channel:
                return False
        if self.fleets is not None and event.labels.get("fleet") not in self.fleets:
            return False
        if self.tags is not None and event.labels.get("tag") not in self.tags:
            return False
        if self.filter is not None:
            try:
                return bool(self.filter.search(envelope or event.body()))
            except jmespath.exceptions.JMESPathError:
                return False
        return True


class RuleSet:
    """All enabled webhooks' rules; ``match`` names the webhooks an event goes to."""

    KEPT = 1024  # (source, type) answers kept at most: a type may come from a payload

    def __init__(self, webhooks: tuple[WebhookConfig, ...]) -> None:
        self.rules = [Rule(w) for w in webhooks]
        self._any_filter = any(r.filter is not None for r in self.rules)
        # When no rule looks further than the event's source and type (the usual case),
        # the answer for a (source, type) pair is worked out once, not per message.
        self._answers: dict[tuple[str, str], tuple[str, ...]] | None = (
            {} if all(r.by_type_only for r in self.rules) else None)

    def match(self, event: Event) -> Sequence[str]:
        answers = self._answers
        if answers is None:
            envelope = event.body() if self._any_filter else None
            return [r.name for r in self.rules if r.matches(event, envelope)]
        key = (event.source, event.type)
        names = answers.get(key)
        if names is None:
            names = tuple(r.name for r in self.rules if r.matches(event))
            if len(answers) < self.KEPT:
                answers[key] = names
        return names
