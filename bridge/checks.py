"""The checks ``webhook-bridge check`` adds to loading: what no event can fill.

Owns two warnings about a loaded configuration. A placeholder in a webhook's ``url``,
``headers`` or ``body`` whose first name is neither an envelope field nor a topic capture
or label of a source the webhook takes can never be filled: every delivery would fail to
render and go to the dead letters (``url: .../{devce_id}``), so it is named, with a "did
you mean". And each webhook's request is rendered once on a sample event shaped like its
sources' events (the ``test`` command's, with every ``payload.*`` the templates use
present), so what fails to render for any event shows before the daemon runs.
And ``mqtt.embedded: true`` without the ``broker`` extra installed is named (``run``
fails on it with the same advice). These are warnings: ``check`` exits 0 unless
``--strict`` is given.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

from .config import Config, WebhookConfig
from .config_yaml import did_you_mean
from .templates import TemplateError, compile_template

# Top-level names of the event envelope (SPEC §3) that a template may start with.
ENVELOPE_FIELDS = frozenset({"id", "type", "source", "topic", "device_id", "received_at",
                             "labels", "payload", "payload_raw", "decode_error",
                             "payload_size", "lwm2m"})
_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _templates(webhook: WebhookConfig) -> Iterator[tuple[str, str]]:
    """(key path, template text) of every template in the webhook's request."""
    parts = urllib.parse.urlsplit(webhook.url)
    yield "url", parts.path
    if parts.query:
        yield "url", parts.query
    for name, value in webhook.headers.items():
        yield f"headers.{name}", value
    yield from _body_templates("body", webhook.body)


def _body_templates(path: str, node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str):
                yield f"{path} key", key
            yield from _body_templates(f"{path}.{key}", value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _body_templates(f"{path}[{i}]", value)


def labels_given(config: Config, webhook: WebhookConfig) -> set[str]:
    """Label names events reaching ``webhook`` can carry: its sources' topic captures
    (other than device_id) and configured labels."""
    names: set[str] = set()
    for source in config.sources:
        if webhook.sources is None or source.name in webhook.sources:
            names.update(_CAPTURE.findall(source.topic))
            names.update(source.labels)
    names.discard("device_id")
    return names


def placeholder_problems(config: Config, webhook: WebhookConfig) -> list[str]:
    labels = labels_given(config, webhook)
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for where, text in _templates(webhook):
        try:
            placeholders = compile_template(text).placeholders
        except TemplateError:
            continue  # loading reported it already
        for placeholder in placeholders:
            path = placeholder.split(".")
            first = path[0]
            if first == "labels" and len(path) > 1:
                if path[1] in labels or (where, placeholder) in seen:
                    continue
                hint = did_you_mean(path[1], labels).replace("'", "'labels.", 1)
                what = f"no source of this webhook has a label or topic capture {path[1]!r}"
            elif first in ENVELOPE_FIELDS or first in labels or (where, placeholder) in seen:
                continue
            else:
                hint = did_you_mean(first, ENVELOPE_FIELDS | labels)
                what = ("it is not an event field (device_id, type, payload..., labels...) "
                        "nor a topic capture or label of this webhook's sources")
            seen.add((where, placeholder))
            problems.append(f"webhooks.{webhook.name}.{where}: placeholder {{{placeholder}}} "
                            f"can never be filled: {what}; every delivery would fail and go "
                            f"to the dead letters{hint}")
    return problems


def render_problem(config: Config, webhook: WebhookConfig) -> str | None:
    """Render the webhook's request for a sample event; the reason when it fails."""
    from .delivery import USER_AGENT
    from .render import Renderer, RenderError
    from .tools import sample_event

    event = sample_event(config, webhook)
    if event.type == "invalid":
        event.payload_raw, event.decode_error = b"\x00", "sample decode error"
    if any(s.format == "lwm2m-emqx" for s in config.sources
           if webhook.sources is None or s.name in webhook.sources):
        event.extra["lwm2m"] = {"path": "/3303/0/5700", "object": 3303, "instance": 0,
                                "resource": 5700, "resource_instance": None}
    if isinstance(event.payload, dict):
        for _, text in _templates(webhook):
            try:
                placeholders = compile_template(text).placeholders
            except TemplateError:
                continue
            for placeholder in placeholders:
                path = placeholder.split(".")
                if path[0] == "payload" and len(path) > 1:
                    _put(event.payload, path[1:])
    try:
        Renderer(webhook, USER_AGENT).render([event])
    except (RenderError, TemplateError, ValueError, TypeError) as exc:
        return (f"webhooks.{webhook.name}: the request does not render for a sample event "
                f"(webhook-bridge test {webhook.name} --dry-run shows it): {exc}")
    return None


def _put(payload: dict[str, Any], path: list[str]) -> None:
    node = payload
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node.setdefault(path[-1], "sample")


BROKER_EXTRA = ("mqtt.embedded: true needs the embedded broker, which is not installed: "
                "pip install 'mqtt-webhook-bridge[broker]' (or set mqtt.embedded: false and "
                "use a broker such as Mosquitto)")


def broker_missing(config: Config) -> bool:
    if not config.mqtt.embedded:
        return False
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return True
    return False


def warnings(config: Config) -> list[str]:
    """Every warning for ``config``, webhook by webhook."""
    out: list[str] = [f"mqtt.embedded: {BROKER_EXTRA}"] if broker_missing(config) else []
    for webhook in config.webhooks:
        problems = placeholder_problems(config, webhook)
        out += problems
        if not problems:  # a placeholder problem also fails the render: say it once
            problem = render_problem(config, webhook)
            if problem:
                out.append(problem)
    return out
