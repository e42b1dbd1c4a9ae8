"""config/schema.json (JSON Schema draft-07, what editors support) and ``check`` agree both
ways: every shipped example passes both, and a fuzzed change to one key is accepted by
``check`` exactly when the schema accepts it."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import ConfigError, load_config

from .support import ROOT

SCHEMA = json.loads((ROOT / "config" / "schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)
EXAMPLES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "config").glob("*.yaml"))}
DIRECTORY = Path(tempfile.mkdtemp(prefix="wb-schema-"))

# Keys whose values ``check`` validates beyond what a schema can say (templates, topic
# syntax, URLs, references between sources and webhooks, files that must exist, secrets a
# type needs): the fuzzing leaves them alone; tests/test_config.py covers them.
SEMANTIC = {"name", "topic", "url", "filter", "body", "headers", "labels", "type", "listen",
            "tls", "auth", "signing", "proxy", "sources", "events", "type_map", "path",
            "shared_group", "client_id", "host", "password", "username", "token",
            "envelope", "channel", "fleets", "tags", "description", "allow_insecure_http"}


def _targets() -> list[tuple[str, ...]]:
    """(section..., key) of every schema property the fuzzing changes."""
    props = SCHEMA["properties"]
    defs = SCHEMA["definitions"]
    out: list[tuple[str, ...]] = [(section,) for section in ("mqtt", "store", "admin", "log")]
    for section in ("mqtt", "store", "admin", "log"):
        out += [(section, key) for key in props[section]["properties"]]
    out += [("sources", "0", key) for key in defs["source"]["properties"]]
    out += [("webhooks", "0", key) for key in defs["webhook"]["properties"]]
    out += [("webhooks", "0", "retry", key) for key in defs["retry"]["properties"]]
    out += [("webhooks", "0", "batch", key) for key in defs["batch"]["oneOf"][2]["properties"]]
    return [t for t in out if t[-1] not in SEMANTIC and not t[-1].endswith("_file")]


TARGETS = _targets()
VALUES: list[Any] = [
    None, True, False, 0, 1, 2, 5, -1, 1883, 65535, 65536, 1.5, 2.0, "", " ", "1883",
    " 42 ", "-3", "0", "1.5", "+7", "yes", "No", "ON", "TRUE", "maybe", "abc", "10s",
    "500ms", "5m", "2h 30m", "-5s", "64KB", "1GB", "12 mb", "20/s", "5/min", "3.1.1", "5",
    "json", "JSON", "senml", "drop_oldest", "Backpressure", "power_loss", "move_aside",
    "POST", "post", "form", "debug", "WARNING", [], ["a"], {}, {"x": 1},
]


def check_accepts(config: dict[str, Any]) -> tuple[bool, str]:
    path = DIRECTORY / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        load_config(str(path))
    except ConfigError as error:
        return False, "\n".join(error.problems)
    return True, ""


def schema_accepts(config: dict[str, Any]) -> tuple[bool, str]:
    errors = sorted(VALIDATOR.iter_errors(config), key=lambda e: list(e.path))
    return not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:3])


def _set(config: dict[str, Any], target: tuple[str, ...], value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    node: Any = config
    for part in target[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                return config
    if target[-2:-1] == ("batch",) and not isinstance(node, dict):
        return config
    node[target[-1]] = value
    return config


def _unit_string(config: dict[str, Any], problems: str) -> bool:
    """The value over the bound is a string (``1GB``): JSON Schema cannot compare it."""
    key = problems.split(": ", 2)[1]  # file:line:col: key.path: problem
    node: Any = config
    for part in key.replace("]", "").replace("[", ".").split("."):
        node = node[int(part)] if isinstance(node, list) else node.get(part)
    return isinstance(node, str)


def _agree(config: dict[str, Any]) -> None:
    by_check, problems = check_accepts(config)
    by_schema, errors = schema_accepts(config)
    if "make initial <= max" in problems:  # a relation between two keys: not a schema's
        return
    if "must be at most" in problems and by_schema and _unit_string(config, problems):
        return  # an upper bound on a size or duration written with a unit: check's alone
    assert by_check == by_schema, (
        f"check {'accepts' if by_check else 'rejects'} ({problems}), schema "
        f"{'accepts' if by_schema else 'rejects'} ({errors}):\n"
        + yaml.safe_dump(config, sort_keys=False))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_shipped_examples_pass_both(name: str) -> None:
    assert check_accepts(EXAMPLES[name]) == (True, "")
    assert schema_accepts(EXAMPLES[name]) == (True, "")


def test_schema_is_draft_07() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert "$defs" not in json.dumps(SCHEMA)


@pytest.mark.parametrize("port", [1883, "1883", " 8883 ", 1883.0])
def test_quoted_port_agrees(port: Any) -> None:
    config = _set(EXAMPLES["example.yaml"], ("mqtt", "port"), port)
    assert check_accepts(config)[0] and schema_accepts(config)[0]


@pytest.mark.parametrize("port", [0, "0", 65536, "65536", "18 83", "port", True, 1.5])
def test_bad_port_rejected_by_both(port: Any) -> None:
    config = _set(EXAMPLES["example.yaml"], ("mqtt", "port"), port)
    assert not check_accepts(config)[0]
    assert not schema_accepts(config)[0]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(EXAMPLES)), st.sampled_from(TARGETS), st.sampled_from(VALUES))
def test_fuzzed_key_agrees(example: str, target: tuple[str, ...], value: Any) -> None:
    config = EXAMPLES[example]
    if target[0] in ("sources", "webhooks") and not config.get(target[0]):
        return
    _agree(_set(config, target, value))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(EXAMPLES)),
       st.sampled_from([("colour",), ("mqtt", "colour"), ("store", "sizee"),
                        ("sources", "0", "qoss"), ("webhooks", "0", "retries"),
                        ("webhooks", "0", "retry", "maximum")]),
       st.sampled_from(VALUES))
def test_unknown_keys_rejected_by_both(example: str, target: tuple[str, ...],
                                       value: Any) -> None:
    config = EXAMPLES[example]
    if target[0] in ("sources", "webhooks") and not config.get(target[0]):
        return
    _agree(_set(config, target, value))


@pytest.mark.parametrize(("target", "value"), [
    (("mqtt", "port"), "${MQTT_PORT:-1883}"), (("mqtt", "embedded"), "${EMBEDDED:-false}"),
    (("store", "max_size"), "${QUOTA:-64MB}"), (("mqtt", "keepalive"), "${KA:-30}"),
    (("log", "level"), "${LOG_LEVEL:-info}")])
def test_environment_placeholders_pass_both(target: tuple[str, ...], value: str) -> None:
    """The schema sees the file before ``${VAR}`` substitution, ``check`` after it."""
    _agree(_set(EXAMPLES["example.yaml"], target, value))
