"""Rendering: a webhook plus its event(s) -> the exact HTTP request to send.

Owns the URL (placeholders percent-encoded, only in path and query, so no device can
change the host or add a path level), header templates (CR/LF refused), the body
(envelope, ``payload_only``/``channel``, or a body template rendered on the parsed
structure so a value can never leave its JSON string) and the batch shape. Signing and
auth headers are added later by delivery; this module is pure.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .config import WebhookConfig
from .events import Event, dumps, iso_now
from .templates import Template, TemplateError, compile_template, lookup, to_text

CONTENT_TYPES = {
    "json": "application/json",
    "form": "application/x-www-form-urlencoded",
    "text": "text/plain; charset=utf-8",
}


class RenderError(ValueError):
    """This event cannot be rendered for this webhook (a missing value, a bad header)."""


@dataclass(slots=True)
class Request:
    method: str
    url: str  # fully percent-encoded; send as is (yarl ``encoded=True``)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


# What urllib.parse.quote(safe="") leaves as it is (RFC 3986 unreserved characters).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def encode_url_value(text: str) -> str:
    """Percent-encode one placeholder value so it stays inside one path level or query
    value: ``/``, ``?``, ``#``, ``@``, ``%`` and the like are all encoded, and a value that
    is only dots (``.``/``..``) is encoded too so it can never be a relative path step."""
    if _UNRESERVED.issuperset(text) and text.strip("."):
        return text  # nothing to encode (a device id, most often): quote's 3 calls saved
    encoded = urllib.parse.quote(text, safe="")
    if encoded and set(encoded) == {"."}:
        encoded = encoded.replace(".", "%2E")
    return encoded


class _BodyTemplate:
    """A body template compiled once: every string in the structure is a template."""

    def __init__(self, body: Any) -> None:
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except json.JSONDecodeError:
                pass  # a plain text template, rendered as one string
        self.tree = self._compile(body)

    def _compile(self, node: Any) -> Any:
        if isinstance(node, str):
            return compile_template(node)
        if isinstance(node, dict):
            return {self._compile_key(k): self._compile(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._compile(v) for v in node]
        return node

    @staticmethod
    def _compile_key(key: Any) -> Any:
        return compile_template(key) if isinstance(key, str) else key

    def render(self, context: dict[str, Any]) -> Any:
        return self._render(self.tree, context)

    def _render(self, node: Any, context: dict[str, Any]) -> Any:
        if isinstance(node, Template):
            path = node.single
            # A lone placeholder keeps the value's JSON type (number, object, ...).
            return lookup(context, path) if path else node.render(context)
        if isinstance(node, dict):
            return {
                (k.render(context) if isinstance(k, Template) else k): self._render(v, context)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [self._render(v, context) for v in node]
        return node


class Renderer:
    """One webhook's request shape, compiled once per configuration."""

    def __init__(self, webhook: WebhookConfig, user_agent: str) -> None:
        self.webhook = webhook
        parts = urllib.parse.urlsplit(webhook.url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._path = compile_template(parts.path or "/")
        self._query = compile_template(parts.query) if parts.query else None
        self._headers = {k: compile_template(v) for k, v in webhook.headers.items()}
        self._body = _BodyTemplate(webhook.body) if webhook.body is not None else None
        self._static_headers = {
            "Content-Type": CONTENT_TYPES[webhook.content_type],
            "User-Agent": user_agent,
        }
        # Cached, since url() and headers() run once per message: the whole URL as one
        # template, that URL cut at its {device_id} placeholders when it has no other one,
        # and the headers when no template has a placeholder (or None: each message fills
        # them in).
        self._url = Template((self._origin, *self._path.parts,
                              *(("?", *self._query.parts) if self._query is not None else ())))
        self._url_pieces = _device_id_pieces(self._url.parts)
        self._fixed_headers: dict[str, str] | None = None
        if all(t.is_literal for t in self._headers.values()):
            try:
                self._fixed_headers = self.headers({})
            except RenderError:
                pass  # refused for every message, by headers()

    def url(self, context: dict[str, Any]) -> str:
        pieces = self._url_pieces
        if pieces is not None:
            if len(pieces) == 1:
                return pieces[0]  # no placeholder at all
            device_id = context.get("device_id")
            if isinstance(device_id, str):  # else lookup() says what is missing
                return encode_url_value(device_id).join(pieces)
        return self._url.render(context, encode_url_value)

    def headers(self, context: dict[str, Any]) -> dict[str, str]:
        if self._fixed_headers is not None:
            return dict(self._fixed_headers)  # a copy: each request owns its headers
        headers = dict(self._static_headers)
        for name, template in self._headers.items():
            value = template.render(context)
            if "\r" in value or "\n" in value or "\0" in value:
                raise RenderError(f"header {name}: the value contains CR, LF or NUL; refused")
            headers[name] = value
        return headers

    def body_value(self, event: Event, envelope: dict[str, Any]) -> Any:
        """The JSON value this event contributes (the whole body, or one batch item)."""
        webhook = self.webhook
        if self._body is not None:
            return self._body.render(envelope)
        if webhook.payload_only:
            payload = event.payload
            if webhook.channel is not None:
                if not isinstance(payload, dict) or "webhook_payload" not in payload:
                    raise RenderError("payload_only with channel: the payload has no "
                                      "webhook_payload field")
                return payload["webhook_payload"]
            return payload
        if webhook.envelope == "payload":
            return event.payload
        if webhook.envelope == "iottly":
            return {"msg": event.payload}
        if webhook.envelope == "zerynth":
            return zerynth_item(event)
        return envelope

    def encode_body(self, value: Any) -> bytes:
        kind = self.webhook.content_type
        if kind == "json":
            return dumps(value)
        if kind == "form":
            if not isinstance(value, dict):
                raise RenderError("content_type form needs the body to be a mapping")
            return urllib.parse.urlencode(
                {str(k): to_text(v) for k, v in value.items() if v is not None}
            ).encode("ascii")
        return to_text(value).encode("utf-8")

    @property
    def passes_stored_event(self) -> bool:
        """The body is the stored event JSON as it is, and the URL and headers need at
        most ``{device_id}``: a delivery can then be sent without parsing its event."""
        webhook = self.webhook
        placeholders = set(self._path.placeholders)
        placeholders.update(self._query.placeholders if self._query else ())
        for template in self._headers.values():
            placeholders.update(template.placeholders)
        return (webhook.envelope == "event" and self._body is None
                and not webhook.payload_only and webhook.content_type == "json"
                and placeholders <= {"device_id"})

    def render_stored(self, event_json: bytes, device_id: str | None) -> Request:
        """The request for one stored event when :attr:`passes_stored_event` holds."""
        context = {"device_id": device_id}
        try:
            return Request(self.webhook.method, self.url(context), self.headers(context),
                           event_json)
        except TemplateError as exc:
            raise RenderError(str(exc)) from None

    def render_stored_batch(self, stored: list[tuple[bytes, str]], device_id: str | None,
                            batch_id: str) -> Request | None:
        """The batch request for stored events ``(event JSON, event id)`` when
        :attr:`passes_stored_event` holds, made from the stored bytes without parsing
        them: each item is the stored envelope with ``"id": "<index>", "event_id"`` in
        place of its ``"id"``, exactly what :meth:`render` builds. None when a stored
        event does not begin with its id (then :meth:`render` must do it)."""
        items = []
        for index, (event_json, event_id) in enumerate(stored):
            quoted = dumps(event_id)
            head = b'{"id":' + quoted + b","
            if not event_json.startswith(head):
                return None
            items.append(b'{"id":"%d","event_id":%s,%s' % (
                index, quoted, event_json[len(head):]))
        body = b'{"batch_id":' + dumps(batch_id) + b',"result":[' + b",".join(items) + b"]}"
        return self.render_stored(body, device_id)

    def render(self, events: list[Event], batch_id: str | None = None) -> Request:
        """The request for one event, or for a batch (``batch_id`` set)."""
        try:
            envelopes = [e.envelope() for e in events]
            context = envelopes[0]
            url = self.url(context)
            headers = self.headers(context)
            if batch_id is None:
                value = self.body_value(events[0], context)
            else:
                value = {"batch_id": batch_id, "result": [
                    _batch_item(i, e.id, self.body_value(e, env))
                    for i, (e, env) in enumerate(zip(events, envelopes))
                ]}
            body = self.encode_body(value)
        except TemplateError as exc:
            raise RenderError(str(exc)) from None
        return Request(self.webhook.method, url, headers, body)


def _device_id_pieces(parts: tuple[str | tuple[str, ...], ...]) -> list[str] | None:
    """The literal text between the ``{device_id}`` placeholders of ``parts`` (a template's
    parts), so that ``encoded_id.join(pieces)`` fills them all; None when another
    placeholder is among them."""
    pieces = [""]
    for part in parts:
        if isinstance(part, str):
            pieces[-1] += part
        elif part == ("device_id",):
            pieces.append("")
        else:
            return None
    return pieces


_ITEM_IDS = frozenset({"id", "event_id"})


def _batch_item(index: int, event_id: str, value: Any) -> dict[str, Any]:
    """Zerynth's ``{"id": "0", ...}`` item; the event's own id moves to ``event_id``.
    Neither can be overwritten by the value (a payload or a template may carry either
    key): the endpoint deduplicates on them."""
    item: dict[str, Any] = {"id": str(index), "event_id": event_id}
    if isinstance(value, dict):
        item.update((k, v) for k, v in value.items() if k not in _ITEM_IDS)
    else:
        item["payload"] = value
    return item


def zerynth_item(event: Event) -> dict[str, Any]:
    """Zerynth's field names: the data format for telemetry, the event format otherwise
    (labels ``workspace``, ``fleet``, ``tag``, ``asset_id``, ``asset_name``, ``device_name``
    fill the ids; a payload ``ts`` in unix seconds is the device's timestamp)."""
    labels = event.labels
    common = {"workspace_id": labels.get("workspace"), "fleet_id": labels.get("fleet"),
              "device_id": event.device_id}
    if event.type != "telemetry":
        return {"ts": event.received_at, **common, "type": event.type, "direction": "d2c",
                "payload": event.payload}
    payload = event.payload
    device_ts = payload.get("ts") if isinstance(payload, dict) else None
    item = {
        "timestamp_device": iso_now(device_ts) if isinstance(device_ts, (int, float))
        and not isinstance(device_ts, bool) else event.received_at,
        "timestamp_in": event.received_at,
        "tag": labels.get("tag"),
        **common,
        "device_name": labels.get("device_name", event.device_id),
        "payload": payload,
    }
    for optional in ("asset_id", "asset_name"):
        if optional in labels:
            item[optional] = labels[optional]
    return item
