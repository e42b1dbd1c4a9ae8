"""YAML with positions and value checks: the machinery under :mod:`bridge.config`.

A config file is composed into PyYAML's node tree and turned into plain Python values
while the line and column of every key and value are remembered by key path. ``${VAR}``
references are substituted on the way. :class:`Section` then reads a mapping with typed
accessors that never raise: each problem is collected as one line of the form
``file:line:column: key.path: what is wrong; how to fix`` and a fallback is returned,
so a single pass reports every problem of a file. The checks of single values (topic
templates, URLs with placeholders, ``{...}`` templates) live here too.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import enum
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml
import yaml.reader
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

KeyPath = tuple[str | int, ...]

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_ENV_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_REF = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_BRACE = re.compile(r"[{}]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
# Bounds on a config file (it is input too: a typo or a hostile file must end in a
# located message within a second, never a traceback or a hang).
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64  # nesting of mappings and lists, aliases included
MAX_VALUES = 10_000  # values after aliases are expanded (a "billion laughs" stops here)
MAX_NUMBER_CHARS = 64  # a number longer than this is refused, not converted
INT_MAX = 2**31 - 1  # the default maximum of a whole number
MAX_SECRET_CHARS = 64 * 1024  # what a *_file key reads
MAX_UNKNOWN_KEYS = 20  # reported one by one per mapping; the rest in one line
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp")}
# libyaml when PyYAML has it: 20-50 times faster than the Python parser.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Missing(enum.Enum):
    """Marks a key that is absent (or invalid), so the dataclass default applies."""

    MISSING = 0


MISSING = Missing.MISSING


@dataclass(frozen=True)
class Mark:
    line: int
    column: int


@dataclass
class Origin:
    """Where values came from: a file name (or label) and the marks of its key paths."""

    name: str
    base_dir: str
    env: Mapping[str, str] | None = None
    allow_files: bool = True
    values: dict[KeyPath, Mark] = field(default_factory=dict)
    keys: dict[KeyPath, Mark] = field(default_factory=dict)
    texts: dict[KeyPath, str] = field(default_factory=dict)
    """Source text of scalars YAML read as numbers or booleans (``0x1F``, ``no``)."""
    refused: set[KeyPath] = field(default_factory=set)
    """Values already reported (a number too long, a bad tag): read as absent."""

    def mark(self, path: KeyPath, *, key: bool = False) -> Mark | None:
        if key and path in self.keys:
            return self.keys[path]
        while path not in self.values:
            if not path:
                return None
            path = path[:-1]
        return self.values[path]

    def where(self, path: KeyPath, *, key: bool = False) -> str:
        mark = self.mark(path, key=key)
        return f"{self.name}:{mark.line}:{mark.column}" if mark else self.name


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + part
    return text


def describe(value: Any) -> str:
    """How a wrong value reads in a message: ``'abc'``, ``a list``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(shorten(value)) if isinstance(value, str) else shorten(str(value))


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a message (a value may be megabytes)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Problems:
    """Collected problem lines, reported in file order then line order."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, int, int, str]] = []
        self._ranks: dict[str, int] = {}

    def add(self, origin: Origin, path: KeyPath, message: str, *, key: bool = False) -> None:
        prefix = f"{format_path(path)}: " if path else ""
        self.add_at(origin.name, origin.mark(path, key=key), prefix + message)

    def add_at(self, name: str, mark: Mark | None, message: str) -> None:
        where = f"{name}:{mark.line}:{mark.column}" if mark else name
        rank = self._ranks.setdefault(name, len(self._ranks))
        line, column = (mark.line, mark.column) if mark else (0, 0)
        self._items.append((rank, line, column, len(self._items), f"{where}: {message}"))

    def __bool__(self) -> bool:
        return bool(self._items)

    def lines(self) -> list[str]:
        return [item[-1] for item in sorted(self._items)]


def _mark(yaml_mark: Any) -> Mark:
    return Mark(yaml_mark.line + 1, yaml_mark.column + 1)


def _syntax_message(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.reader.ReaderError):  # no problem_mark; a multi-line str()
        return (f"invalid YAML: character #x{error.character:04x} is not allowed"
                f" ({error.reason}); remove it or save the file as UTF-8 text")
    problem = (getattr(error, "problem", None) or str(error)).replace("\n", " ")
    if isinstance(error, _TooDeep):
        return problem
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    return f"invalid YAML: {problem}; fix the syntax there (indentation, quotes, ':' after keys)"


def substitute(text: str, report: Callable[[str], None], env: Mapping[str, str] | None) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` and ``$${`` escapes; ``env=None`` refuses refs."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "$${":
            return "${"
        if match.group(1) is None:
            report("unterminated '${'; close it with '}' or write '$${' for a literal '${'")
            return token
        ref = _ENV_REF.fullmatch(match.group(1))
        if ref is None:
            report(f"malformed reference '{token}'; use ${{NAME}} or ${{NAME:-default}}"
                   " (write '$${' for a literal '${')")
            return token
        if env is None:
            report(f"environment reference '{token}' is not accepted here; send the value itself"
                   " (or '$${' for a literal '${')")
            return token
        name, default = ref.group(1), ref.group(2)
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            report(f"environment variable '{name}' is not set; set it or give a default:"
                   f" ${{{name}:-value}}")
            return token
        return value

    return _ENV_TOKEN.sub(replace, text)


class _Converter:
    """YAML node tree -> plain values, recording marks and substituting ``${VAR}``.

    Aliases are expanded here, so this is where a file can blow up: the values produced
    (:data:`MAX_VALUES`) and the nesting (:data:`MAX_DEPTH`) are bounded, merge keys are
    checked, and only the standard tags are accepted."""

    def __init__(self, origin: Origin, problems: Problems) -> None:
        self.origin = origin
        self.problems = problems
        self.constructor = SafeConstructor()
        self.resolver = Resolver()
        self.active: set[int] = set()
        self.budget = MAX_VALUES
        self.stopped = False

    def convert(self, node: yaml.Node, path: KeyPath) -> Any:
        if self.stopped:
            return None
        self.origin.values[path] = _mark(node.start_mark)
        self.budget -= 1
        if self.budget < 0 or len(path) > MAX_DEPTH:
            self.stopped = True  # one problem; the rest of the document is not read
            self.problems.add(self.origin, path, (
                f"the document expands to more than {MAX_VALUES} values (an alias '*name'"
                " repeats all it refers to); simplify it" if self.budget < 0 else
                f"nested deeper than {MAX_DEPTH} levels; flatten it"))
            return None
        if id(node) in self.active:
            self.problems.add(self.origin, path, "an alias refers to itself; remove the cycle")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                if node.tag != _TAG + "map":
                    return self._bad_tag(node, path)
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _TAG + "seq":
                    return self._bad_tag(node, path)
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self.active.discard(id(node))

    def _bad_tag(self, node: yaml.Node, path: KeyPath) -> None:
        self.origin.refused.add(path)
        tag = node.tag.replace(_TAG, "!!")
        self.problems.add(self.origin, path, f"unsupported YAML tag '{shorten(tag)}'; remove"
                          " it (only plain mappings, lists, text, numbers, booleans, null)")
        return None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        first: dict[str, Mark] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            mark = _mark(key_node.start_mark)
            if key_node.value in first:
                self.origin.keys[(*path, key_node.value)] = mark
                seen = first[key_node.value]
                self.problems.add(self.origin, (*path, key_node.value),
                                  f"duplicate key (first at line {seen.line}); remove one of them",
                                  key=True)
            first.setdefault(key_node.value, mark)
        result = self._merged(merges, path) if merges else {}
        explicit: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.add(self.origin, path, "keys must be plain text, not lists or"
                                  f" mappings (line {key_node.start_mark.line + 1})")
                continue
            key = key_node.value
            key_path = (*path, key)
            if key not in explicit:
                self.origin.keys[key_path] = _mark(key_node.start_mark)
            explicit.add(key)
            result[key] = self.convert(value_node, key_path)
        return result

    def _merged(self, merges: list[yaml.Node], path: KeyPath) -> dict[str, Any]:
        """The mappings of ``<<`` keys (YAML merge): the first one given wins a key, and
        the mapping's own keys win over all of them. A merged key keeps the position
        where it is written (in the anchored mapping)."""
        own = self.origin.values[path]
        sources: list[yaml.Node] = []
        for value in merges:
            items = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for item in items:
                if not isinstance(item, yaml.MappingNode):
                    self.problems.add_at(self.origin.name, _mark(item.start_mark), (
                        f"{format_path(path) + ': ' if path else ''}a merge key '<<' takes a"
                        " mapping (such as *defaults) or a list of them; fix or remove it"))
                    continue
                sources.append(item)
        result: dict[str, Any] = {}
        for item in reversed(sources):
            merged = self.convert(item, path)
            if isinstance(merged, dict):
                result.update(merged)
        self.origin.values[path] = own
        return result

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        if node.tag not in _SCALAR_TAGS:
            return self._bad_tag(node, path)
        value = self._construct(node, path)
        if isinstance(value, str) and "$" in value:
            value = self._substitute(node, value, path)
        if isinstance(value, (int, float)):
            self.origin.texts[path] = node.value
        return value

    def _substitute(self, node: yaml.ScalarNode, value: str, path: KeyPath) -> Any:
        def report(message: str) -> None:
            self.problems.add(self.origin, path, message)

        text = substitute(value, report, self.origin.env)
        if node.style is None and text and text != value:
            node = yaml.ScalarNode(self.resolver.resolve(yaml.ScalarNode, text, (True, False)),
                                   text)
            return self._construct(node, path)
        return text

    def _construct(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        if node.tag == _TIMESTAMP_TAG or node.tag == _STR_TAG:
            return node.value
        if node.tag in (_TAG + "int", _TAG + "float") and len(node.value) > MAX_NUMBER_CHARS:
            # int() of a huge digit string is slow (and refused past 4300 digits).
            self.origin.refused.add(path)
            self.problems.add(self.origin, path, f"a number of {len(node.value)} characters"
                              " is out of range; give a smaller one (or quote it if it is text)")
            return node.value
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ValueError, TypeError, KeyError, OverflowError, yaml.YAMLError):
            tag = node.tag.replace(_TAG, "!!")
            self.origin.refused.add(path)
            self.problems.add(self.origin, path, f"{describe(node.value)} is not a valid"
                              f" {tag} value; fix it or remove the tag")
            return node.value


def read_yaml(origin: Origin, problems: Problems) -> Any:
    """Parse ``origin.name`` into plain values; :data:`MISSING` when it cannot be read."""
    try:
        with open(origin.name, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        problems.add(origin, (), f"cannot read the config file: {error.strerror or error};"
                     " check the path (-c PATH or WEBHOOK_BRIDGE_CONFIG) and its permissions")
        return MISSING
    if len(data) > MAX_FILE_BYTES:
        problems.add_at(origin.name, Mark(1, 1), f"the file is larger than"
                        f" {MAX_FILE_BYTES // 1024} KB; a configuration is much smaller:"
                        " check that this is the right file")
        return MISSING
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        problems.add_at(origin.name, _byte_mark(data, error.start),
                        f"byte 0x{data[error.start]:02x} is not UTF-8 text ({error.reason});"
                        " save the file as UTF-8")
        return MISSING
    try:
        _check_depth(text)
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as error:
        problems.add_at(origin.name, _error_mark(error, text), _syntax_message(error))
        return MISSING
    if root is None:
        return {}
    return _Converter(origin, problems).convert(root, ())


def _byte_mark(data: bytes, offset: int) -> Mark:
    line_start = data.rfind(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", "replace")) + 1
    return Mark(data.count(b"\n", 0, offset) + 1, column)


class _TooDeep(yaml.MarkedYAMLError):
    """Valid YAML, nested or sized past a bound."""


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` before composing (the composer
    recurses once per level: 5,000 ``[`` would exhaust the stack)."""
    depth = 0
    for count, event in enumerate(yaml.parse(text, Loader=_LOADER)):
        if count > 2 * MAX_VALUES:  # keys and values, before aliases are expanded
            raise _TooDeep(problem=f"the file has more than {MAX_VALUES} values; a"
                           " configuration is much smaller: check that this is the right file",
                           problem_mark=event.start_mark)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooDeep(problem=f"nested deeper than {MAX_DEPTH} levels; flatten it",
                               problem_mark=event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _error_mark(error: yaml.YAMLError, text: str = "") -> Mark:
    mark = getattr(error, "problem_mark", None)
    if mark is None and isinstance(error, yaml.reader.ReaderError) and text:
        position = error.position  # characters into the text
        start = text.rfind("\n", 0, position) + 1
        return Mark(text.count("\n", 0, position) + 1, position - start + 1)
    return Mark(mark.line + 1, mark.column + 1) if mark else Mark(1, 1)


class NumberText(str):
    """The digits of a number too long to convert (from :func:`json_number`)."""


def json_number(text: str) -> int | NumberText:
    """``parse_int`` for :func:`json.loads` of untrusted bodies: :func:`plain_tree` then
    refuses a number longer than :data:`MAX_NUMBER_CHARS` as a YAML file's would be."""
    return int(text) if len(text) <= MAX_NUMBER_CHARS else NumberText(text)


def plain_tree(data: Any, origin: Origin, problems: Problems, path: KeyPath = ()) -> Any:
    """The same treatment as a YAML file for already-parsed data (REST API bodies)."""
    if len(path) > MAX_DEPTH:
        origin.refused.add(path)
        problems.add(origin, path, f"nested deeper than {MAX_DEPTH} levels; flatten it")
        return None
    if isinstance(data, NumberText) or (isinstance(data, int) and not isinstance(data, bool)
                                        and len(str(data)) > MAX_NUMBER_CHARS):
        origin.refused.add(path)
        problems.add(origin, path, f"a number of {len(str(data))} characters is out of range;"
                     " give a smaller one (or quote it if it is text)")
        return str(data)
    if isinstance(data, Mapping):
        result: dict[str, Any] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                problems.add(origin, path, f"keys must be text, got {describe(key)}")
                continue
            result[key] = plain_tree(value, origin, problems, (*path, key))
        return result
    if isinstance(data, (list, tuple)):
        return [plain_tree(item, origin, problems, (*path, i)) for i, item in enumerate(data)]
    if isinstance(data, str) and "$" in data:
        return substitute(data, lambda m: problems.add(origin, path, m), origin.env)
    return data


@dataclass
class Ctx:
    origin: Origin
    problems: Problems

    def problem(self, path: KeyPath, message: str, *, key: bool = False) -> None:
        self.problems.add(self.origin, path, message, key=key)


class Section:
    """A mapping under validation: typed getters that record problems and return MISSING.

    Every getter marks its key as known; :meth:`finish` reports the keys nobody asked for.
    A text key ``x`` may also be given as ``x_file`` (the value read from that file).
    """

    def __init__(self, ctx: Ctx, path: KeyPath, data: Any) -> None:
        self.ctx = ctx
        self.path = path
        self.is_mapping = data is None or data is MISSING or isinstance(data, dict)
        if not self.is_mapping:
            ctx.problem(path, f"expected a mapping, got {describe(data)}; write 'key: value' lines")
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        self.known: set[str] = set()

    def problem(self, key: str | int | None, message: str, *, at_key: bool = False) -> None:
        path = self.path if key is None else (*self.path, key)
        self.ctx.problem(path, message, key=at_key)

    def raw(self, key: str) -> Any:
        self.known.add(key)
        if self.ctx.origin.refused and (*self.path, key) in self.ctx.origin.refused:
            return MISSING  # reported already
        return self.data.get(key, MISSING)

    def as_text(self, path: KeyPath, value: Any) -> str | None:
        """``value`` as written when it is a scalar (``no`` stays ``no``), else None."""
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            written = self.ctx.origin.texts.get(path)
            return written if written is not None or isinstance(value, bool) else str(value)
        return None

    def _absent(self, key: str, required: bool, hint: str = "") -> Missing:
        if required and self.is_mapping:
            self.problem(None, f"missing required key '{key}'{hint}; add it")
        return MISSING

    def text(self, key: str, *, required: bool = False, nullable: bool = False,
             file_ok: bool = True) -> Any:
        """A string (numbers are accepted as their text); ``key_file`` reads it from a file."""
        value = self.raw(key)
        file_key = f"{key}_file"
        if file_ok:
            self.known.add(file_key)
            if file_key in self.data:
                if value is not MISSING:
                    self.problem(file_key, f"both '{key}' and '{file_key}' are set; keep only one",
                                 at_key=True)
                    return MISSING
                return self._nonblank(file_key, self._read_file(file_key), required)
        if value is MISSING:
            return self._absent(key, required, f" (or '{file_key}')" if file_ok else "")
        if value is None and nullable:
            return None
        text = self.as_text((*self.path, key), value)
        if text is None:
            self.problem(key, f"expected a string, got {describe(value)}")
            return MISSING
        return self._nonblank(key, text, required)

    def _nonblank(self, key: str, text: Any, required: bool) -> Any:
        if required and isinstance(text, str) and not text.strip():
            self.problem(key, "must not be empty; give a value")
            return MISSING
        return text

    def _read_file(self, file_key: str) -> Any:
        name = self.data[file_key]
        if not self.ctx.origin.allow_files:
            self.problem(file_key, f"'{file_key}' is not accepted here; send the value itself")
            return MISSING
        if not isinstance(name, str) or not name:
            self.problem(file_key, f"expected a file path, got {describe(name)}")
            return MISSING
        path = resolve_path(name, self.ctx.origin.base_dir)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # /dev/zero or a FIFO: no end
                self.problem(file_key, f"'{path}' is not a regular file; give a file")
                return MISSING
            with open(path, encoding="utf-8") as stream:
                text = stream.read(MAX_SECRET_CHARS + 1)
            if len(text) > MAX_SECRET_CHARS:
                self.problem(file_key, f"'{path}' is longer than {MAX_SECRET_CHARS}"
                             " characters; is it the right file?")
                return MISSING
            return text.rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            self.problem(file_key, f"cannot read '{path}': {reason}; create the file or fix the"
                         " path")
            return MISSING

    def path_value(self, key: str, *, must_exist: bool = False) -> Any:
        """A file system path, relative ones resolved against the config file's directory."""
        value = self.text(key, nullable=True, file_ok=False)
        if not isinstance(value, str):
            return value
        if not value.strip():
            self.problem(key, "must not be empty; give a path or remove the key")
            return MISSING
        path = resolve_path(value, self.ctx.origin.base_dir)
        if must_exist and not os.path.isfile(path):
            self.problem(key, f"file '{path}' does not exist; fix the path")
            return MISSING
        return path

    def integer(self, key: str, *, minimum: int | None = None,
                maximum: int | None = None) -> Any:
        value = self.raw(key)
        if value is MISSING:
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            if len(value.strip()) > MAX_NUMBER_CHARS:
                self.problem(key, f"a number of {len(value.strip())} characters is out of"
                             " range; give a smaller one")
                return MISSING
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.problem(key, f"expected a whole number, got {describe(value)}")
            return MISSING
        # Counts go to SQLite and to sizes of lists: past 2**31 is a typo, not a setting.
        return self._in_range(key, value, minimum, INT_MAX if maximum is None else maximum)

    def _in_range(self, key: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if minimum is not None and value < minimum:
            self.problem(key, f"must be at least {minimum}, got {value}")
            return MISSING
        if maximum is not None and value > maximum:
            self.problem(key, f"must be at most {maximum}, got {value}")
            return MISSING
        return value

    def boolean(self, key: str) -> Any:
        value = self.raw(key)
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        if value is MISSING or isinstance(value, bool):
            return value
        self.problem(key, f"expected true or false, got {describe(value)}")
        return MISSING

    def parsed(self, key: str, parse: Callable[[Any], Any], *, nullable: bool = False,
               minimum: Any = None, maximum: Any = None) -> Any:
        """A value converted by ``parse`` (which raises ValueError with the message)."""
        value = self.raw(key)
        if value is MISSING or (value is None and nullable):
            return value
        if isinstance(value, (dict, list)) or value is None:
            self.problem(key, f"expected a single value, got {describe(value)}")
            return MISSING
        try:
            result = parse(value)
        except (ValueError, OverflowError) as error:
            self.problem(key, str(error))
            return MISSING
        return self._in_range(key, result, minimum, maximum)

    def choice(self, key: str, allowed: Iterable[Any]) -> Any:
        """One of ``allowed`` (compared case-insensitively as text), returned canonical."""
        value = self.raw(key)
        if value is MISSING:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # qos: 1.0 is 1, as JSON Schema (and so the schema) says
        options = list(allowed)
        by_text = {str(option).lower(): option for option in options}
        if not isinstance(value, (dict, list, bool)) and str(value).lower() in by_text:
            return by_text[str(value).lower()]
        listed = ", ".join(str(option) for option in options)
        hint = did_you_mean(str(value), (str(o) for o in options)) if isinstance(value, str) else ""
        self.problem(key, f"invalid value {describe(value)}; use one of: {listed}{hint}")
        return MISSING

    def strings(self, key: str) -> Any:
        """A list of strings (a single string is a list of one), as a tuple."""
        value = self.raw(key)
        if value is MISSING or value is None:
            return MISSING
        listed = isinstance(value, list)
        paths = [(*self.path, key, i) for i in range(len(value))] if listed else [(*self.path, key)]
        items = value if listed else [value]
        if not items:
            self.problem(key, "an empty list matches nothing; remove the key to match all")
            return MISSING
        result = []
        for path, item in zip(paths, items):
            text = self.as_text(path, item)
            if text is None:
                self.ctx.problem(path, f"expected a string or a list of strings, got"
                                 f" {describe(item)}")
                return MISSING
            result.append(text)
        return tuple(result)

    def string_map(self, key: str) -> Any:
        """A mapping of strings to strings (scalar values are converted to text)."""
        value = self.raw(key)
        if value is MISSING or value is None:
            return MISSING
        if not isinstance(value, dict):
            self.problem(key, f"expected a mapping of names to values, got {describe(value)}")
            return MISSING
        result: dict[str, str] = {}
        for name, item in value.items():
            text = self.as_text((*self.path, key, name), item)
            if text is None:
                self.ctx.problem((*self.path, key, name), f"expected a text value, got"
                                 f" {describe(item)}")
                continue
            result[name] = text
        return result

    def section(self, key: str) -> Section | None:
        """The nested mapping under ``key``; None when absent or null."""
        value = self.raw(key)
        if value is MISSING or value is None:
            return None
        return Section(self.ctx, (*self.path, key), value)

    def items(self, key: str, what: str) -> list[tuple[KeyPath, Any]]:
        value = self.raw(key)
        if value is MISSING or value is None:
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected a list of {what}, got {describe(value)}; start each"
                         " entry with '- '")
            return []
        return [((*self.path, key, i), item) for i, item in enumerate(value)]

    def only(self, keys: Iterable[str], reason: str) -> None:
        """Report present ``keys`` (or their ``_file`` forms) as not applicable."""
        for key in keys:
            for name in (key, f"{key}_file"):
                if name in self.data:
                    self.known.add(name)
                    self.problem(name, f"'{name}' {reason}; remove it", at_key=True)

    def finish(self) -> None:
        unknown = [key for key in self.data if key not in self.known]
        for key in unknown[:MAX_UNKNOWN_KEYS]:
            hint = did_you_mean(key, self.known) if len(key) < 100 else ""
            if not hint:
                listed = sorted(k for k in self.known if not k.endswith("_file"))
                hint = f"; remove it (known keys: {', '.join(listed)})"
            self.problem(key, f"unknown key '{shorten(key)}'{hint}", at_key=True)
        if len(unknown) > MAX_UNKNOWN_KEYS:
            key = unknown[MAX_UNKNOWN_KEYS]
            self.problem(key, f"and {len(unknown) - MAX_UNKNOWN_KEYS} more unknown keys from"
                         " here on; is this the right file?", at_key=True)


def resolve_path(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def template_spans(text: str) -> list[tuple[int, int]]:
    """Start/end of each ``{placeholder}``; ``{{``/``}}`` are literal braces."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        if text.startswith(("{{", "}}"), i):
            i += 2
        elif text[i] == "{":
            end = text.find("}", i)
            if end < 0 or "{" in text[i + 1:end]:
                raise ValueError(f"unclosed '{{' at character {i + 1}; close the placeholder"
                                 " or write '{{' for a literal brace")
            if not text[i + 1:end].strip():
                raise ValueError(f"empty placeholder '{{}}' at character {i + 1}; name a field"
                                 " such as {device_id}")
            spans.append((i, end + 1))
            i = end + 1
        elif text[i] == "}":
            raise ValueError(f"unmatched '}}' at character {i + 1}; write '}}}}' for a literal"
                             " brace")
        else:  # on to the next brace (a URL may be long: no Python loop per character)
            found = _BRACE.search(text, i)
            if found is None:
                break
            i = found.start()
    return spans


def topic_problem(topic: str) -> str | None:
    if not topic:
        return "must not be empty; give an MQTT topic filter such as devices/{device_id}/up"
    levels = topic.split("/")
    names: set[str] = set()
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            return "'#' must be the last level; move it to the end or use '+'"
        if level.startswith("{") and level.endswith("}"):
            name = level[1:-1]
            if not _IDENT.fullmatch(name):
                return f"invalid placeholder '{level}'; use a name like {{device_id}}"
            if name in names:
                return f"placeholder '{level}' appears twice; give each level its own name"
            names.add(name)
        elif level not in ("+", "#") and any(c in level for c in "+#{}"):
            return (f"invalid level '{level}'; a level is literal text, '+', '#' or exactly one"
                    " {name}")
    return None


def url_problem(url: str, *, insecure: bool, templates: bool = True) -> str | None:
    """Why ``url`` is unfit as a webhook target (None when fine)."""
    if _SPACE_OR_CONTROL.search(url):
        return "the URL contains spaces or control characters; percent-encode them (%20)"
    try:
        spans = template_spans(url)
    except ValueError as error:
        return str(error)
    if spans and not templates:
        return "placeholders are not allowed in this URL; write it literally"
    plain = list(url)
    for start, end in spans:
        plain[start:end] = "x" * (end - start)
    try:
        parts = urlsplit("".join(plain))
    except ValueError as error:  # "https://[::1" and the like
        return f"the URL is malformed ({error}); write https://host[:port]/path"
    return (_placeholder_position_problem(url, spans, parts)
            or _scheme_problem(parts.scheme.lower(), insecure)
            or _authority_problem(parts))


def _placeholder_position_problem(url: str, spans: list[tuple[int, int]],
                                  parts: SplitResult) -> str | None:
    authority_end = len(parts.scheme) + 1
    if url.startswith("//", authority_end):
        authority_end += 2 + len(parts.netloc)
    fragment = url.find("#")
    for start, end in spans:
        if start < authority_end or 0 <= fragment < start:
            return (f"placeholder '{url[start:end]}' is outside the path and query; placeholders"
                    " are allowed only in the path and query, never in scheme, host, port or"
                    " user info")
    return None


def _scheme_problem(scheme: str, insecure: bool) -> str | None:
    if scheme == "http" and not insecure:
        return "http:// URLs are refused; use https:// or set allow_insecure_http: true"
    if scheme not in ("http", "https"):
        return f"unsupported URL scheme '{scheme}'; use https://host/path"
    return None


def _authority_problem(parts: SplitResult) -> str | None:
    try:
        host = parts.hostname
    except ValueError as error:  # "https://[zz]/": not an IP address in brackets
        return f"the URL has no valid host ({error}); write https://host[:port]/path"
    if not host or not HOST.fullmatch(host):
        return "the URL has no valid host; write https://host[:port]/path"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "the URL has an invalid port; use a number from 1 to 65535"
    return None


def listen_problem(listen: str) -> str | None:
    host, sep, port = listen.rpartition(":")
    if (not sep or not host.strip("[]") or not (port.isascii() and port.isdigit()) or len(port) > 5
            or int(port) > 65535):
        return f"invalid address {listen!r}; use host:port such as 127.0.0.1:9883 (null disables)"
    return None


def whsec_problem(secret: str) -> str | None:
    body = secret[len("whsec_"):]
    try:
        valid = secret.startswith("whsec_") and len(base64.b64decode(body, validate=True)) > 0
    except (binascii.Error, ValueError):
        valid = False
    if valid:
        return None
    return ("a standard-webhooks secret must look like whsec_<base64>; fix it, or remove it to"
            " have one generated (webhook-bridge secret show NAME)")


def check_templates(ctx: Ctx, path: KeyPath, value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            check_templates(ctx, (*path, key), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_templates(ctx, (*path, i), item)
    elif isinstance(value, str):
        try:
            template_spans(value)
        except ValueError as error:
            ctx.problem(path, str(error))
