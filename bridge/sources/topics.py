"""Topic templates: ``devices/{device_id}/telemetry`` -> filter ``devices/+/telemetry``.

Owns turning a source's topic template into the MQTT subscription filter and matching a
received topic against it, returning the captured levels. Pure and allocation-light: it
runs once per message for every source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    template: str
    filter: str
    levels: tuple[str | None, ...]  # literal level, or None for a wildcard level
    captures: tuple[tuple[int, str], ...]  # (level index, name)
    multi: bool  # ends in '#'

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        levels: list[str | None] = []
        filter_levels: list[str] = []
        captures: list[tuple[int, str]] = []
        parts = template.split("/")
        multi = False
        for index, level in enumerate(parts):
            capture = _CAPTURE.match(level)
            if capture:
                captures.append((index, capture.group(1)))
                levels.append(None)
                filter_levels.append("+")
            elif level == "+":
                levels.append(None)
                filter_levels.append("+")
            elif level == "#":
                if index != len(parts) - 1:
                    raise ValueError("'#' must be the last level of a topic")
                multi = True
                filter_levels.append("#")
            elif any(c in level for c in "+#{}"):
                raise ValueError(
                    f"topic level {level!r} mixes text with a wildcard; a level is literal "
                    "text, +, #, or a whole {name}"
                )
            else:
                levels.append(level)
                filter_levels.append(level)
        return cls(template, "/".join(filter_levels), tuple(levels), tuple(captures), multi)

    def match(self, topic: str) -> dict[str, str] | None:
        """The captured levels when ``topic`` matches this template, else None."""
        parts = topic.split("/")
        if len(parts) < len(self.levels) or (not self.multi and len(parts) != len(self.levels)):
            return None
        if self.multi and parts and parts[0].startswith("$") and not self.levels:
            return None  # MQTT: '#' alone does not match $SYS-style topics
        for want, got in zip(self.levels, parts):
            if want is not None and want != got:
                return None
        return {name: parts[index] for index, name in self.captures}
