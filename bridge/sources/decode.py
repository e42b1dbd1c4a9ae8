"""Decoding: one MQTT message on one source -> the events it yields.

Owns the payload formats (``json``, ``text``, ``binary`` here; ``senml``, ``senml-cbor`` and
``lwm2m-emqx`` through their modules), the source's ``type`` template and ``type_map``, its
``labels`` templates, and the rule that nothing is dropped silently: a payload that does
not decode becomes an ``invalid`` event carrying ``payload_raw`` and ``decode_error``.

Topic captures other than ``{device_id}`` become labels of the same name; the ``labels``
templates are rendered after the type, so they may use ``{type}``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from ..config import SourceConfig
from ..events import INVALID, Event, iso_now
from ..templates import Template, TemplateError, compile_template
from .bounds import EVENT_TYPE_MAX, JSONBoundError, load_json
from .topics import TopicTemplate


class DecodeError(ValueError):
    """The payload is not valid in the source's format."""


def _json(data: bytes) -> Any:
    try:
        return load_json(data)
    except JSONBoundError as exc:
        raise DecodeError(f"not JSON: {exc}") from None


def _text(data: bytes) -> Any:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8 text: {exc}") from None


def _binary(data: bytes) -> Any:
    return base64.b64encode(data).decode("ascii")


PayloadDecoder = Callable[[bytes], Any]
_SIMPLE: dict[str, PayloadDecoder] = {"json": _json, "text": _text, "binary": _binary}


def _senml(cbor: bool) -> PayloadDecoder:
    def decode(data: bytes) -> Any:
        from . import senml

        try:
            return senml.decode_senml_cbor(data) if cbor else senml.decode_senml_json(data)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None

    return decode


class SourceDecoder:
    """Everything needed to turn a message on one source into events, compiled once."""

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.topic = TopicTemplate.parse(source.topic)
        self.type_template: Template = compile_template(source.type)
        # A fixed type is mapped once here; a template's result is mapped per message.
        self.type_map: dict[str, str] = dict(source.type_map)
        self.fixed_type: str | None = None
        if self.type_template.is_literal:
            fixed = self.type_template.render({})
            self.fixed_type = self.type_map.get(fixed, fixed)
        self.label_templates = {k: compile_template(v) for k, v in source.labels.items()}
        # Most sources have a fixed type and no label templates: nothing to render per
        # message, the event is complete as made.
        self._plain = self.fixed_type is not None and not self.label_templates
        self._lwm2m: Any = None
        if source.format == "lwm2m-emqx":
            from .lwm2m import Lwm2mDecoder

            # Firmware (Object 5) progress is tracked by the device registry, across
            # sources (EMQX sends it on its own topic) and restarts.
            self._lwm2m = Lwm2mDecoder(firmware=None)
            self._decode = None
        elif source.format in ("senml", "senml-cbor"):
            self._decode = _senml(source.format == "senml-cbor")
        else:
            self._decode = _SIMPLE[source.format]

    def events(self, topic: str, payload: bytes, captures: dict[str, str],
               oversize: int | None = None) -> list[Event]:
        """The events of one message; never raises: a payload the format refuses (or
        past a bound, or that trips a decoder bug) is one ``invalid`` event. ``oversize``
        is the size of a payload over ``mqtt.max_payload`` that was not kept."""
        device_id = captures.get("device_id")
        # Captures besides the device id become labels (most topics have none: no loop).
        if len(captures) > (device_id is not None):
            labels = {k: v for k, v in captures.items() if k != "device_id"}
        else:
            labels = {}
        received_at = iso_now()
        if oversize is not None:
            event = self._invalid(topic, b"", device_id, labels, received_at,
                                  f"payload of {oversize} bytes is over mqtt.max_payload")
            event.payload_size = oversize
            return [event]
        try:
            if self._lwm2m is not None:
                return self._lwm2m_events(topic, payload, device_id, labels, received_at)
            decoded = self._decode(payload)  # type: ignore[misc]
        except DecodeError as exc:
            return [self._invalid(topic, payload, device_id, labels, received_at, str(exc))]
        except Exception as exc:  # a decoder bug must not escape: name it instead
            error = f"{self.source.format} decoder failed: {type(exc).__name__}: {exc}"
            return [self._invalid(topic, payload, device_id, labels, received_at,
                                  error[:300])]
        # A fixed type is the event's from the start (_finish would set it).
        event = Event(type=self.fixed_type or "", source=self.source.name, topic=topic,
                      payload=decoded, device_id=device_id, labels=labels,
                      received_at=received_at)
        return [event if self._plain else self._finish(event, payload)]

    def _lwm2m_events(self, topic: str, payload: bytes, device_id: str | None,
                      labels: dict[str, str], received_at: str) -> list[Event]:
        from .lwm2m import DecodeError as Lwm2mDecodeError

        try:
            decoded = self._lwm2m.decode(device_id or "", payload)
        except (Lwm2mDecodeError, ValueError) as exc:
            return [self._invalid(topic, payload, device_id, labels, received_at, str(exc))]
        events = []
        for item in decoded:
            extra = {"lwm2m": item.lwm2m} if item.lwm2m is not None else {}
            event = Event(type=item.type, source=self.source.name, topic=topic,
                          payload=item.payload, device_id=device_id, labels=dict(labels),
                          received_at=received_at, extra=extra)
            events.append(self._finish(event, payload, keep_type=True))
        return events

    def _finish(self, event: Event, raw: bytes, keep_type: bool = False) -> Event:
        """Apply the type template and ``type_map``, then the label templates; a template
        the payload cannot fill makes the event ``invalid`` rather than losing it."""
        if self.fixed_type is not None and not self.label_templates:
            if not keep_type:
                event.type = self.fixed_type
            return event  # the common case: nothing to render, no envelope to build
        context = event.body()
        try:
            if not keep_type:
                if self.fixed_type is not None:
                    event.type = self.fixed_type
                else:
                    rendered = self.type_template.render(context)
                    event.type = self.type_map.get(rendered, rendered)
                    if len(event.type) > EVENT_TYPE_MAX:
                        return self._invalid(
                            event.topic, raw, event.device_id, event.labels,
                            event.received_at, f"source {self.source.name}: the type is "
                            f"longer than {EVENT_TYPE_MAX} characters (EVENT_TYPE_MAX)")
                context["type"] = event.type
            for name, template in self.label_templates.items():
                event.labels[name] = template.render(context)
        except TemplateError as exc:
            return self._invalid(event.topic, raw, event.device_id, event.labels,
                                 event.received_at, f"source {self.source.name}: {exc}")
        return event

    def _invalid(self, topic: str, raw: bytes, device_id: str | None,
                 labels: dict[str, str], received_at: str, error: str) -> Event:
        return Event(type=INVALID, source=self.source.name, topic=topic, device_id=device_id,
                     labels=labels, received_at=received_at, payload_raw=raw,
                     decode_error=error)
