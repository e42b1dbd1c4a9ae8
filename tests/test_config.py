"""Config loader: defaults, substitution, conf.d, and errors naming file:line:column."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import (
    AuthConfig,
    BatchConfig,
    ConfigError,
    MQTTConfig,
    RetryConfig,
    SigningConfig,
    SourceConfig,
    StoreConfig,
    TLSConfig,
    WebhookConfig,
    dump_webhook,
    format_duration,
    load_config,
    parse_duration,
    parse_rate,
    parse_size,
    webhook_from_mapping,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
SCHEMA = ROOT / "config" / "schema.json"

SOURCE = """\
sources:
  - name: telemetry
    topic: devices/{device_id}/telemetry
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == str(caught.value).split("\n")
    return caught.value.problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def assert_at(problem: str, path: Path, line: int, key_path: str, *fragments: str) -> None:
    prefix = f"{path}:{line}:"
    assert problem.startswith(prefix), problem
    column, rest = problem[len(prefix):].split(": ", 1)
    assert int(column) >= 1, problem
    assert rest.startswith(f"{key_path}: "), problem
    for fragment in fragments:
        assert fragment in rest, problem


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STATE_DIRECTORY", "WB_TEST_TOKEN", "WB_TEST_HOST", "WB_TEST_PORT"):
        monkeypatch.delenv(name, raising=False)


# --- the shipped example --------------------------------------------------------------


def test_example_loads_without_environment() -> None:
    config = load_config(str(EXAMPLE))
    base = EXAMPLE.parent
    assert config.path == str(EXAMPLE)
    assert config.mqtt.embedded is True
    assert (config.mqtt.host, config.mqtt.port) == ("127.0.0.1", 1883)
    assert config.store.path == str(base / "state" / "queue.db")
    assert config.state_dir == str(base / "state")
    assert config.admin.listen == "127.0.0.1:9883"
    assert config.sources == (SourceConfig(name="telemetry", topic="devices/{device_id}/telemetry",
                                           qos=1, format="json"),)
    [hook] = config.webhooks
    assert hook.name == "local-receiver"
    assert hook.url == "http://127.0.0.1:8080/ingest/{device_id}"
    assert hook.allow_insecure_http is True
    assert config.webhook("local-receiver") is hook


def test_example_validates_against_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(EXAMPLE.read_text()))


SCHEMA_SECTIONS = {
    ("properties", "mqtt"): MQTTConfig,
    ("properties", "store"): StoreConfig,
    ("definitions", "source"): SourceConfig,
    ("definitions", "webhook"): WebhookConfig,
    ("definitions", "auth"): AuthConfig,
    ("definitions", "signing"): SigningConfig,
    ("definitions", "retry"): RetryConfig,
}


@pytest.mark.parametrize("where", list(SCHEMA_SECTIONS), ids=lambda w: w[1])
def test_schema_keys_match_dataclass_fields(where: tuple[str, str]) -> None:
    node = json.loads(SCHEMA.read_text())
    for step in where:
        node = node[step]
    names = {f.name for f in dataclasses.fields(SCHEMA_SECTIONS[where])}
    keys = set(node["properties"])
    file_keys = {k for k in keys if k.endswith("_file") and k[:-5] in names}
    assert keys - file_keys == names
    assert node["additionalProperties"] is False


def test_schema_nested_tls_and_batch_match_dataclasses() -> None:
    defs = json.loads(SCHEMA.read_text())["definitions"]
    tls = next(o for o in defs["tls"]["oneOf"] if o.get("type") == "object")
    batch = next(o for o in defs["batch"]["oneOf"] if o.get("type") == "object")
    assert set(tls["properties"]) == {f.name for f in dataclasses.fields(TLSConfig)}
    assert set(batch["properties"]) == {f.name for f in dataclasses.fields(BatchConfig)}


# --- defaults and full parsing --------------------------------------------------------


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path / "c.yaml", "")))
    assert config.mqtt == MQTTConfig(client_id=f"webhook-bridge-{socket.gethostname()}")
    assert config.store.path == "/var/lib/webhook-bridge/queue.db"
    assert config.state_dir == "/var/lib/webhook-bridge"
    assert (config.sources, config.webhooks) == ((), ())


def test_store_path_defaults_to_first_state_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/run/state/a:/run/state/b")
    config = load_config(str(write(tmp_path / "c.yaml", "store: {max_size: 64KB}\n")))
    assert config.store.path == "/run/state/a/queue.db"
    assert config.state_dir == "/run/state/a"
    assert config.store.max_size == 64 * 1024


def test_mqtt_tls_changes_default_port(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path / "c.yaml", "mqtt: {tls: {verify: false}}\n")))
    assert config.mqtt.port == 8883
    assert config.mqtt.tls == TLSConfig(verify=False)
    config = load_config(str(write(tmp_path / "c.yaml", "mqtt: {tls: true, port: 1884}\n")))
    assert (config.mqtt.port, config.mqtt.tls) == (1884, TLSConfig())


FULL = """
mqtt:
  host: broker.local
  client_id: gw-1
  username: bridge
  password_file: secrets/mqtt
  protocol: 3.1.1
  session_expiry: 1h
  keepalive: 45
  shared_group: bridges
  tls: {ca_file: certs/ca.pem, cert_file: certs/c.pem, key_file: certs/c.key}
store: {path: q/queue.db, max_size: 1GB, overflow: backpressure, durability: process_crash}
admin: {listen: "[::1]:9000", token: t0k}
log: {format: json, level: debug}
sources:
  - name: telemetry
    topic: devices/{device_id}/+/#
    qos: 2
    format: senml
    type: "{payload.event}"
    labels: {fleet: flt-1, n: 7, up: true}
    type_map: {online: connection, 0: disconnection}
webhooks:
  - name: cloud
    description: to the cloud
    enabled: false
    sources: telemetry
    events: [telemetry, "device.*"]
    channel: alerts
    fleets: flt-1
    tags: [d1, d2]
    filter: "payload.temp > `30`"
    url: https://api.example.com/ingest/{device_id}?site={labels.site}
    method: PUT
    content_type: form
    payload_only: true
    envelope: iottly
    body: {device: "{device_id}", n: [1, 2.5, null], lit: "{{x}}"}
    headers: {X-Site: plant-7, X-N: 3}
    auth: {type: oauth2, token_url: "https://auth.example.com/token", client_id: c,
           client_secret_file: secrets/oauth, scope: read}
    signing: {scheme: hmac-sha256, secret: s3cret, header: X-Sig}
    batch: {max_events: 10, max_wait: 500ms}
    tls: {ca_file: certs/ca.pem, verify: false}
    timeout: 2.5
    concurrency: 1
    rate_limit: 100/m
    ordered: true
    retry: {initial: 2s, max: 1h, max_age: 2d}
    failure_limit: 0
"""


def full_config(tmp_path: Path) -> Path:
    # `check` loads every TLS file it names: real ones.
    ca = trustme.CA()
    (tmp_path / "certs").mkdir()
    ca.cert_pem.write_to_path(str(tmp_path / "certs/ca.pem"))
    client = ca.issue_cert("gateway.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "certs/c.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "certs/c.key"))
    write(tmp_path / "secrets" / "mqtt", "pw\n")
    write(tmp_path / "secrets" / "oauth", "cs\n")
    return write(tmp_path / "c.yaml", FULL)


def test_full_config_parses_every_key(tmp_path: Path) -> None:
    config = load_config(str(full_config(tmp_path)))
    certs = tmp_path / "certs"
    assert config.mqtt == MQTTConfig(
        host="broker.local", port=8883, client_id="gw-1", username="bridge", password="pw",
        protocol="3.1.1", session_expiry=3600, keepalive=45, shared_group="bridges",
        tls=TLSConfig(ca_file=str(certs / "ca.pem"), cert_file=str(certs / "c.pem"),
                      key_file=str(certs / "c.key")))
    assert config.store == StoreConfig(path=str(tmp_path / "q" / "queue.db"), max_size=1024**3,
                                       overflow="backpressure", durability="process_crash")
    assert (config.admin.listen, config.admin.token) == ("[::1]:9000", "t0k")
    assert (config.log.format, config.log.level) == ("json", "debug")
    assert config.sources == (SourceConfig(
        name="telemetry", topic="devices/{device_id}/+/#", qos=2, format="senml",
        type="{payload.event}", labels={"fleet": "flt-1", "n": "7", "up": "true"},
        type_map={"online": "connection", "0": "disconnection"}),)
    assert config.webhooks == (WebhookConfig(
        name="cloud", url="https://api.example.com/ingest/{device_id}?site={labels.site}",
        description="to the cloud", enabled=False, sources=("telemetry",),
        events=("telemetry", "device.*"), channel="alerts", fleets=("flt-1",), tags=("d1", "d2"),
        filter="payload.temp > `30`", method="PUT", content_type="form", payload_only=True,
        envelope="iottly", body={"device": "{device_id}", "n": [1, 2.5, None], "lit": "{{x}}"},
        headers={"X-Site": "plant-7", "X-N": "3"},
        auth=AuthConfig(type="oauth2", token_url="https://auth.example.com/token",
                        client_id="c", client_secret="cs", scope="read"),
        signing=SigningConfig(scheme="hmac-sha256", secret="s3cret", header="X-Sig"),
        batch=BatchConfig(max_events=10, max_wait=0.5),
        tls=TLSConfig(ca_file=str(certs / "ca.pem"), verify=False),
        timeout=2.5, concurrency=1, rate_limit=100 / 60, ordered=True,
        retry=RetryConfig(initial=2.0, max=3600.0, max_age=172800.0), failure_limit=0),)


def test_full_config_validates_against_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(FULL))


def test_enumerations_are_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + "log: {level: DEBUG}\nwebhooks:\n"
                 "  - {name: a, url: 'https://a.example/', method: patch, envelope: Payload}\n")
    config = load_config(str(path))
    hook = config.webhooks[0]
    assert (config.log.level, hook.method, hook.envelope) == ("debug", "PATCH", "payload")


def test_yaml_keys_are_read_as_written(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "sources:\n  - name: s\n    topic: a\n"
                 "    labels: {on: yes, 1: 2.0}\n")
    assert load_config(str(path)).sources[0].labels == {"on": "yes", "1": "2.0"}


def test_scalars_in_text_fields_keep_their_written_form(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
mqtt: {username: 0x1F, password: 012, client_id: 1.50}
webhooks:
  - {name: a, url: 'https://a.example/', fleets: [NO, 7], tags: no, channel: off}
""")
    config = load_config(str(path))
    assert (config.mqtt.username, config.mqtt.password, config.mqtt.client_id) == (
        "0x1F", "012", "1.50")
    hook = config.webhooks[0]
    assert (hook.fleets, hook.tags, hook.channel) == (("NO", "7"), ("no",), "off")


def test_list_entry_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "sources:\n  - telemetry\n")
    assert only_problem(path) == (f"{path}:2:5: sources[0]: expected a mapping, got"
                                  " 'telemetry'; write 'key: value' lines")


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - &base {name: a, url: "https://a.example/", timeout: 3s, retry: {max: 1m}}
  - {<<: *base, name: b, timeout: 4s}
""")
    a, b = load_config(str(path)).webhooks
    assert (a.name, a.timeout, a.retry.max) == ("a", 3.0, 60.0)
    assert (b.name, b.url, b.timeout, b.retry.max) == ("b", "https://a.example/", 4.0, 60.0)


# --- substitution ---------------------------------------------------------------------


def test_env_substitution_with_default_and_escape(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WB_TEST_HOST", "broker.example")
    monkeypatch.setenv("WB_TEST_PORT", "2883")
    path = write(tmp_path / "c.yaml", """
        mqtt:
          host: ${WB_TEST_HOST}
          port: ${WB_TEST_PORT}
          client_id: gw-${WB_TEST_UNSET:-fallback}-$${HOME}
          username: "${WB_TEST_UNSET:-}"
    """)
    mqtt = load_config(str(path)).mqtt
    assert (mqtt.host, mqtt.port) == ("broker.example", 2883)
    assert mqtt.client_id == "gw-fallback-${HOME}"
    assert mqtt.username == ""


def test_missing_env_var_names_variable_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
    auth: {type: bearer, token: "${WB_TEST_TOKEN}"}
""")
    assert_at(only_problem(path), path, 7, "webhooks[0].auth.token",
              "environment variable 'WB_TEST_TOKEN' is not set", "${WB_TEST_TOKEN:-value}")


def test_file_keys_read_and_strip_trailing_newline(tmp_path: Path) -> None:
    write(tmp_path / "token", "abc\n\n")
    path = write(tmp_path / "c.yaml", "admin: {token_file: token}\nmqtt: {password_file: "
                 f"{tmp_path / 'token'}}}\n")
    config = load_config(str(path))
    assert (config.admin.token, config.mqtt.password) == ("abc", "abc")


def test_missing_file_key_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """
        mqtt:
          username: u
          password_file: /nonexistent/pw
    """)
    assert_at(only_problem(path), path, 3, "mqtt.password_file",
              "cannot read '/nonexistent/pw'", "No such file")


def test_value_and_file_key_together_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "pw", "x")
    path = write(tmp_path / "c.yaml", "mqtt:\n  password: a\n  password_file: pw\n")
    assert_at(only_problem(path), path, 3, "mqtt.password_file",
              "both 'password' and 'password_file' are set")


# --- errors: each names file:line, the key path and the fix ---------------------------


def test_yaml_syntax_error_is_one_problem_at_its_mark(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "mqtt:\n  host: a\n port: 1\nstore: {bad: 1}\n")
    assert only_problem(path).startswith(f"{path}:3:2: invalid YAML: ")


def test_unreadable_main_file(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "missing.yaml")
    assert problem.startswith(f"{tmp_path / 'missing.yaml'}: cannot read the config file")


def test_unknown_key_with_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
    concurency: 2
""")
    problem = only_problem(path)
    assert problem == (f"{path}:7:5: webhooks[0].concurency: unknown key 'concurency';"
                       " did you mean 'concurrency'?")


def test_unknown_top_level_key_without_close_match_lists_known(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "mqtt: {}\nzzz: 1\n")
    assert_at(only_problem(path), path, 2, "zzz", "unknown key 'zzz'", "known keys: admin, log")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "mqtt:\n  host: a\n  host: b\n")
    assert only_problem(path) == (f"{path}:3:3: mqtt.host: duplicate key (first at line 2);"
                                  " remove one of them")


@pytest.mark.parametrize(("line", "expected"), [
    ("concurrency: abc", "expected a whole number, got 'abc'"),
    ("timeout: [1]", "expected a single value, got a list"),
    ("timeout: soon", "invalid duration 'soon'"),
    ("timeout: 0s", "must be longer than 0"),
    ("enabled: maybe", "expected true or false, got 'maybe'"),
    ("concurrency: 0", "must be at least 1, got 0"),
    ("method: GET", "invalid value 'GET'; use one of: POST, PUT, PATCH"),
    ("envelope: evnt", "use one of: event, payload, iottly, zerynth; did you mean 'event'?"),
    ("rate_limit: 5/fortnight", "invalid rate '5/fortnight'"),
    ("failure_limit: -1", "must be at least 0, got -1"),
    ("headers: [a]", "expected a mapping of names to values, got a list"),
    ("description: {a: 1}", "expected a string, got a mapping"),
    ("events: []", "an empty list matches nothing"),
    ("retry: {initial: 10m}", "initial (10m) is longer than max (5m); make initial <= max"),
    ("batch: {max_events: 0}", "must be at least 1, got 0"),
    ("signing: {scheme: standard-webhooks, secret: nope}", "must look like whsec_<base64>"),
    ("signing: {scheme: standard-webhooks, header: X}", "applies only to scheme hmac-sha256"),
    ("auth: {type: basic, username: u, password: p, token: t}",
     "'token' does not apply to auth type 'basic'"),
    ("auth: {type: bearer}", "missing required key 'token' (or 'token_file')"),
    ("auth: {type: digest}", "use one of: none, basic, bearer, header, oauth2"),
    ("tls: {cert_file: /etc/hostname}", "cert_file and key_file go together"),
    ("tls: {ca_file: /nonexistent.pem}", "file '/nonexistent.pem' does not exist"),
    ("tls: {ca_file: /etc/hostname}", "cannot load CA certificates from '/etc/hostname':"
     " no certificate in the file; give a PEM file of CA certificates"),
    ("tls: {cert_file: /etc/hostname, key_file: /etc/hostname}",
     "cannot load the client certificate '/etc/hostname' with key '/etc/hostname': not a PEM"
     " file, or the key does not match the certificate"),
    ('body: {a: "{x"}', "unclosed '{'"),
])
def test_webhook_value_errors(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + "webhooks:\n  - name: a\n"
                 f"    url: https://a.example/\n    {line}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:7:"), problem
    assert f": webhooks[0].{line.split(':')[0]}" in problem
    assert expected in problem


def test_http_url_refused_without_opt_out(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: http://a.example/in
""")
    assert only_problem(path) == (
        f"{path}:6:10: webhooks[0].url: http:// URLs are refused; use https:// or set"
        " allow_insecure_http: true")
    path.write_text(path.read_text() + "    allow_insecure_http: true\n")
    assert load_config(str(path)).webhooks[0].url == "http://a.example/in"


@pytest.mark.parametrize("url", [
    "https://{device_id}.example.com/x",
    "https://api.example.com:{port}/x",
    "https://{user}@api.example.com/x",
    "{scheme}://api.example.com/x",
    "https://api.example.com/x#{frag}",
])
def test_placeholder_outside_path_and_query_refused(tmp_path: Path, url: str) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + f"webhooks:\n  - name: a\n    url: '{url}'\n")
    assert_at(only_problem(path), path, 6, "webhooks[0].url",
              "placeholders are allowed only in the path and query")


def test_literal_braces_in_url_are_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE +
                 "webhooks:\n  - name: a\n    url: 'https://a.example/{{x}}/{device_id}?q={topic}'\n")
    assert load_config(str(path)).webhooks[0].url == "https://a.example/{{x}}/{device_id}?q={topic}"


def test_duplicate_webhook_names_name_both_places(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
  - name: a
    url: https://b.example/
""")
    assert only_problem(path) == (
        f"{path}:7:11: webhooks[1].name: duplicate webhook name 'a' (also defined at"
        f" {path}:5:11); rename one of them")


def test_bad_jmespath_filter(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
    filter: "payload.temp >"
""")
    assert_at(only_problem(path), path, 7, "webhooks[0].filter",
              "invalid JMESPath expression: incomplete expression")


def test_unknown_source_in_webhook(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
    sources: [telemetry, telemetri]
""")
    problem = only_problem(path)
    assert problem == (f"{path}:7:26: webhooks[0].sources[1]: unknown source 'telemetri';"
                       " did you mean 'telemetry'?")


def test_header_value_with_crlf_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + """\
webhooks:
  - name: a
    url: https://a.example/
    headers:
      X-Ok: fine
      X-Bad: "a\\r\\nInjected: 1"
""")
    assert_at(only_problem(path), path, 9, "webhooks[0].headers.X-Bad",
              "must not contain CR, LF")


def test_invalid_header_name_points_at_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", SOURCE + "webhooks:\n  - name: a\n"
                 "    url: https://a.example/\n    headers:\n      'Bad Name': x\n")
    assert only_problem(path).startswith(f"{path}:8:7: webhooks[0].headers.Bad Name: ")


@pytest.mark.parametrize(("topic", "expected"), [
    ("a/#/b", "'#' must be the last level"),
    ("a/{x}y", "invalid level '{x}y'"),
    ("a/b+", "invalid level 'b+'"),
    ("a/{1x}", "invalid placeholder '{1x}'"),
    ("a/{x}/{x}", "appears twice"),
    ("''", "must not be empty"),
])
def test_topic_template_errors(tmp_path: Path, topic: str, expected: str) -> None:
    path = write(tmp_path / "c.yaml", f"sources:\n  - name: s\n    topic: {topic}\n")
    assert_at(only_problem(path), path, 3, "sources[0].topic", expected)


def test_source_enumerations_and_names(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """
        sources:
          - name: Bad Name
            topic: a/b
            qos: 3
            format: xml
        log: {level: verbose}
    """)
    problems = problems_of(path)
    assert [p.split(": ")[0] for p in problems] == [
        f"{path}:2:11", f"{path}:4:10", f"{path}:5:13", f"{path}:6:14"]
    assert "use only lowercase letters" in problems[0]
    assert "use one of: 0, 1, 2" in problems[1]
    assert "use one of: json, text, binary, senml, senml-cbor, lwm2m-emqx" in problems[2]
    assert "use one of: debug, info, warning, error" in problems[3]


def test_type_map_maps_rendered_types(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """
        sources:
          - name: status
            topic: devices/{device_id}/status
            format: text
            type: "{payload}"
            type_map: {online: connection, offline: disconnection, on: "yes", 1: up}
          - name: plain
            topic: devices/{device_id}/telemetry
    """)
    status, plain = load_config(str(path)).sources
    # Keys and values are read as written (no YAML 1.1 booleans, numbers as text).
    assert status.type_map == {"online": "connection", "offline": "disconnection",
                               "on": "yes", "1": "up"}
    assert plain.type_map == {}


@pytest.mark.parametrize(("line", "expected"), [
    ("type_map: [online, offline]", "expected a mapping of names to values, got a list"),
    ("type_map: {online: ''}", "maps 'online' to an empty event type"),
    ("type_map: {online: [a]}", "expected a text value, got a list"),
    ("type_map: {'': connection}", "an empty type cannot be mapped"),
    ("typemap: {online: connection}", "unknown key 'typemap'; did you mean 'type_map'?"),
])
def test_type_map_errors(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path / "c.yaml", "sources:\n  - name: s\n    topic: a/{device_id}\n"
                 f"    format: text\n    {line}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:5:"), problem
    assert f": sources[0].{line.split(':')[0]}" in problem
    assert expected in problem


def test_type_map_refused_on_lwm2m_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """
        sources:
          - name: lwm2m
            topic: lwm2m/{device_id}/up/#
            format: lwm2m-emqx
            type_map: {device.write: write}
    """)
    assert_at(only_problem(path), path, 5, "sources[0].type_map",
              "does not apply to format lwm2m-emqx", "remove it")


def test_type_map_validates_against_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    source = {"name": "s", "topic": "a/{device_id}", "format": "text", "type": "{payload}",
              "type_map": {"online": "connection", "offline": "disconnection"}}
    validator.validate({"sources": [source]})
    for bad in ({"online": ""}, {"": "connection"}, {"online": ["a"]}, ["online"]):
        assert not validator.is_valid({"sources": [{**source, "type_map": bad}]}), bad


def test_every_problem_is_collected_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", """
        mqtt: {port: 70000, protocol: 4}
        store: {max_size: lots, overflow: drop}
        admin: {listen: nowhere}
    """)
    problems = problems_of(path)
    assert [p.split(": ")[1] for p in problems] == [
        "mqtt.port", "mqtt.protocol", "store.max_size", "store.overflow", "admin.listen"]
    assert all(p.startswith(f"{path}:{n}:") for p, n in zip(problems, [1, 1, 2, 2, 3]))


# --- conf.d ---------------------------------------------------------------------------


def test_conf_d_is_merged_in_sorted_order(tmp_path: Path) -> None:
    main = write(tmp_path / "config.yaml", SOURCE +
                 "webhooks:\n  - {name: main, url: 'https://m.example/'}\n")
    write(tmp_path / "conf.d" / "b.yaml", "webhooks:\n  - {name: b, url: 'https://b.example/'}\n")
    write(tmp_path / "conf.d" / "a.yaml", """
        sources:
          - {name: extra, topic: 'x/{device_id}'}
        webhooks:
          - {name: a, url: 'https://a.example/', sources: [extra, telemetry]}
    """)
    write(tmp_path / "conf.d" / "ignored.yml", "webhooks: [{name: z}]\n")
    config = load_config(str(main))
    assert [w.name for w in config.webhooks] == ["main", "a", "b"]
    assert [s.name for s in config.sources] == ["telemetry", "extra"]


def test_conf_d_errors_name_their_own_file(tmp_path: Path) -> None:
    main = write(tmp_path / "config.yaml", SOURCE +
                 "webhooks:\n  - {name: a, url: 'https://a.example/'}\n")
    extra = write(tmp_path / "conf.d" / "x.yaml", """
        webhooks:
          - name: b
            url: http://b.example/
          - name: a
            url: https://a2.example/
        mqtt: {host: other}
    """)
    problems = problems_of(main)
    assert problems == [
        f"{extra}:3:10: webhooks[0].url: http:// URLs are refused; use https:// or set"
        " allow_insecure_http: true",
        f"{extra}:4:11: webhooks[1].name: duplicate webhook name 'a' (also defined at"
        f" {main}:5:12); rename one of them",
        f"{extra}:6:1: mqtt: unknown key 'mqtt'; remove it (known keys: sources, webhooks)",
    ]


def test_conf_d_syntax_error_names_its_file(tmp_path: Path) -> None:
    main = write(tmp_path / "config.yaml", "")
    extra = write(tmp_path / "conf.d" / "bad.yaml", "webhooks: [\n")
    assert only_problem(main).startswith(f"{extra}:2:1: invalid YAML: ")


# --- dump / REST API ------------------------------------------------------------------


def test_dump_webhook_keeps_only_non_defaults(tmp_path: Path) -> None:
    hook = WebhookConfig(name="a", url="https://a.example/${x}", timeout=30.0,
                         auth=AuthConfig(type="bearer", token="t"), tags=("d1",),
                         retry=RetryConfig(max=600.0), rate_limit=20.0,
                         batch=BatchConfig())
    assert dump_webhook(hook) == {
        "name": "a", "url": "https://a.example/$${x}", "tags": ["d1"],
        "auth": {"type": "bearer", "token": "t"}, "batch": {}, "timeout": "30s",
        "rate_limit": "20/s", "retry": {"max": "10m"}}
    assert dump_webhook(hook, escape=False)["url"] == "https://a.example/${x}"


def test_dump_round_trips_through_conf_d_and_api(tmp_path: Path) -> None:
    main = full_config(tmp_path)
    [hook] = load_config(str(main)).webhooks
    hook = dataclasses.replace(hook, name="copy", headers={"X-T": "${NOT_ENV}"})
    data = dump_webhook(hook)
    write(tmp_path / "conf.d" / "copy.yaml", yaml.safe_dump({"webhooks": [data]}))
    assert load_config(str(main)).webhook("copy") == hook
    assert webhook_from_mapping(json.loads(json.dumps(data)), "api") == hook


def test_webhook_from_mapping_reports_with_origin() -> None:
    with pytest.raises(ConfigError) as caught:
        webhook_from_mapping({"name": "x", "url": "http://a/", "timeout": "x",
                              "sources": ["nope"]}, "POST /api/v1/webhooks", sources=["telemetry"])
    assert caught.value.problems == [
        "POST /api/v1/webhooks: url: http:// URLs are refused; use https:// or set"
        " allow_insecure_http: true",
        "POST /api/v1/webhooks: timeout: invalid duration 'x'; use a number with a unit:"
        " 500ms, 10s, 5m, 24h, 7d",
        "POST /api/v1/webhooks: sources[0]: unknown source 'nope'; known sources: telemetry",
    ]


def test_webhook_from_mapping_refuses_env_and_files_unless_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WB_TEST_TOKEN", "secret")
    write(tmp_path / "tok", "from-file\n")
    data: dict[str, Any] = {"name": "x", "url": "https://a.example/",
                            "auth": {"type": "bearer", "token": "${WB_TEST_TOKEN}"}}
    with pytest.raises(ConfigError, match="environment reference"):
        webhook_from_mapping(data, "api")
    assert webhook_from_mapping(data, "api", trusted=True).auth.token == "secret"
    data["auth"] = {"type": "bearer", "token_file": "tok"}
    with pytest.raises(ConfigError, match="'token_file' is not accepted here"):
        webhook_from_mapping(data, "api", base_dir=str(tmp_path))
    hook = webhook_from_mapping(data, "api", base_dir=str(tmp_path), trusted=True)
    assert hook.auth.token == "from-file"


# --- durations, sizes, rates ----------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("24h", 86400.0), ("7d", 604800.0),
    ("1h30m", 5400.0), (" 2 s ", 2.0), ("1.5s", 1.5), (30, 30.0), (0.25, 0.25), ("45", 45.0),
    ("10S", 10.0),
])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5s", "5 minutes", True, None, "1e3s"])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_parse_duration_round_trip(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert seconds == count * UNITS[unit]
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("512B", 512), ("64KB", 65536), ("256MB", 256 * 1024**2), ("1GB", 1024**3),
    ("1.5KB", 1536), ("2kib", 2048), ("10", 10), (4096, 4096), ("1 M", 1024**2),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "10XB", "-1KB", False])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "rate"), [
    ("20/s", 20.0), ("120/m", 2.0), ("36/h", 0.01), (5, 5.0), ("2.5", 2.5),
])
def test_parse_rate(text: str | int, rate: float) -> None:
    assert parse_rate(text) == rate


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    path = write(sub / "c.yaml", "store: {path: ../var/q.db}\n")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        assert load_config(str(path)).store.path == str(tmp_path / "var" / "q.db")
    finally:
        os.chdir(cwd)
