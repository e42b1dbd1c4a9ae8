"""Placeholder templates: ``{device_id}``, ``{payload.a.b}``, ``{labels.fleet}``, ``{{``.

Owns parsing a template once and filling it from an event envelope. A placeholder is a
dotted path looked up in the envelope; a first segment the envelope lacks is looked up in
its labels, so a topic capture such as ``{site}`` works wherever ``{labels.site}`` does.
Callers decide how a value is encoded (URL, header, JSON); this module never escapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|\{|\}")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


class TemplateError(ValueError):
    """A template that does not parse, or a value an event does not have."""


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal strings and placeholder paths, in order."""

    parts: tuple[str | tuple[str, ...], ...]

    @property
    def placeholders(self) -> list[str]:
        return [".".join(p) for p in self.parts if isinstance(p, tuple)]

    @property
    def is_literal(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    @property
    def single(self) -> tuple[str, ...] | None:
        """The path when the template is exactly one placeholder and nothing else."""
        if len(self.parts) == 1 and isinstance(self.parts[0], tuple):
            return self.parts[0]
        return None

    def render(self, context: dict[str, Any], encode: Any = None) -> str:
        """Fill every placeholder; ``encode`` turns each value's text into its final form."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                text = to_text(lookup(context, part))
                out.append(encode(text) if encode else text)
        return "".join(out)


def compile_template(text: str) -> Template:
    parts: list[str | tuple[str, ...]] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[pos:match.start()])
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
        elif match.group(1) is not None:
            name = match.group(1).strip()
            if not _PATH.match(name):
                raise TemplateError(
                    f"placeholder {{{match.group(1)}}} is not a dotted name like "
                    "{payload.temp}; write {{ for a literal brace"
                )
            if "".join(literal):
                parts.append("".join(literal))
            literal = []
            parts.append(tuple(name.split(".")))
        else:
            raise TemplateError(f"unmatched '{token}' at {match.start()}; write {token * 2} "
                                "for a literal brace")
    literal.append(text[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    return Template(tuple(parts))


_MISSING = object()


def lookup(context: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``; a missing or null value raises :class:`TemplateError`."""
    value: Any = context.get(path[0], _MISSING)
    if value is _MISSING:
        value = (context.get("labels") or {}).get(path[0], _MISSING)
    for key in path[1:]:
        if isinstance(value, dict):
            value = value.get(key, _MISSING)
        elif isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            value = _MISSING
        if value is _MISSING:
            break
    if value is _MISSING or value is None:
        raise TemplateError(f"the event has no value for {{{'.'.join(path)}}}")
    return value


def to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
