"""Topic templates: ``devices/{device_id}/telemetry`` -> filter ``devices/+/telemetry``.

Owns turning a source's topic template into the MQTT subscription filter and matching a
received topic against it, returning the captured levels. Pure and allocation-light: it
runs once per message for every source (one compiled regular expression, made once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CAPTURE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    template: str
    filter: str
    levels: tuple[str | None, ...]  # literal level, or None for a wildcard level
    captures: tuple[tuple[int, str], ...]  # (level index, name)
    multi: bool  # ends in '#'
    # The whole template as one regular expression (a level: [^/]*, '#': the rest), so a
    # match is a single C call rather than a split and a loop over the levels.
    pattern: re.Pattern[str] = field(compare=False, repr=False)
    names: tuple[str, ...] = field(compare=False, repr=False)  # of the pattern's groups

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        levels: list[str | None] = []
        filter_levels: list[str] = []
        captures: list[tuple[int, str]] = []
        parts = template.split("/")
        regex_levels: list[str] = []
        multi = False
        for index, level in enumerate(parts):
            capture = _CAPTURE.match(level)
            if capture:
                captures.append((index, capture.group(1)))
                levels.append(None)
                filter_levels.append("+")
                regex_levels.append("([^/]*)")
            elif level == "+":
                levels.append(None)
                filter_levels.append("+")
                regex_levels.append("[^/]*")
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
                regex_levels.append(re.escape(level))
        regex = "/".join(regex_levels)
        if multi:  # 'a/#' matches 'a' and anything under it; '#' alone matches anything
            regex = regex + "(?:/.*)?" if regex_levels else ".*"
        return cls(template, "/".join(filter_levels), tuple(levels), tuple(captures), multi,
                   re.compile(regex, re.DOTALL), tuple(name for _, name in captures))

    def match(self, topic: str) -> dict[str, str] | None:
        """The captured levels when ``topic`` matches this template, else None."""
        found = self.pattern.fullmatch(topic)
        if found is None:
            return None
        if self.multi and not self.levels and topic.startswith("$"):
            return None  # MQTT: '#' alone does not match $SYS-style topics
        # Captures in level order: a name used twice keeps its last level.
        return dict(zip(self.names, found.groups()))
