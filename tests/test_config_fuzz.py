"""A config file is input too: whatever it holds, `check` (and `run`) end in 0 or 78 with
located messages, within a second, never with a traceback or a hang (SPEC §2, issue 11).

Adversarial files (alias bombs, deep nesting, huge numbers, bad merge keys, malformed URLs,
binary, tags, TLS files that do not load) and random ones (hypothesis: random bytes,
mutations of the shipped example, random trees of known keys) go through the CLI's
``main`` in-process; a few run as subprocesses to prove the exit code and the absence of
a traceback; the admin API refuses what `check` refuses with the same message.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.config import ConfigError, load_config, webhook_from_mapping
from bridge.config_yaml import MAX_DEPTH

from .support import ROOT, Certificates, Endpoint, free_port, run_cli
from .test_admin import API, running, write_config

EXAMPLE = (ROOT / "config" / "example.yaml").read_text()
TIME_BOUND = 1.0  # seconds for one `check`, in-process
HOOK = "webhooks:\n  - name: w\n    url: https://example.com/in\n"


def bomb(levels: int = 9, width: int = 9) -> str:
    """The billion laughs: each anchor repeats the previous one ``width`` times."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]")
    return "\n".join(lines) + f"\nwebhooks: *l{levels - 1}\n"


def merge_bomb(levels: int = 40) -> str:
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for n in range(1, levels):
        lines.append(f"m{n}: &m{n} {{<<: [*m{n - 1}, *m{n - 1}], k{n}: 1}}")
    return "\n".join(lines) + f"\nmqtt: *m{levels - 1}\n"


def deep_aliases(levels: int = 30) -> str:
    """Each anchor nests the previous one three levels deeper: shallow in the file, deep
    once the aliases are expanded."""
    lines = ["d0: &d0 [[[x]]]"]
    for n in range(1, levels):
        lines.append(f"d{n}: &d{n} [[[*d{n - 1}]]]")
    return "\n".join(lines) + f"\nwebhooks: *d{levels - 1}\n"


ADVERSARIAL: dict[str, bytes | str] = {
    "billion laughs": bomb(),
    "merge bomb": merge_bomb(),
    "deep through aliases": deep_aliases(),
    "5000 nested lists": "a: " + "[" * 5000 + "]" * 5000 + "\n",
    "3000 nested flow maps": "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n",
    "block nesting": "".join(f"{'  ' * n}k{n}:\n" for n in range(200)) + "  " * 200 + "x\n",
    "6000-digit port": "mqtt:\n  port: " + "9" * 6000 + "\n",
    "quoted 6000-digit port": "mqtt:\n  port: '" + "9" * 6000 + "'\n",
    "4000-digit keepalive": "mqtt:\n  keepalive: " + "9" * 4000 + "\n",
    "huge float": "mqtt:\n  keepalive: 1e99999\n",
    "huge keepalive": "mqtt:\n  keepalive: 70000\n",
    "huge concurrency": HOOK + "    concurrency: 100000000000000000000\n",
    "huge size": "store:\n  max_size: 99999999999999999999TB\n",
    "huge rate": HOOK + "    rate_limit: " + "9" * 400 + "/s\n",
    "huge listen port": "admin:\n  listen: 127.0.0.1:" + "9" * 5000 + "\n",
    "env number": "mqtt:\n  port: ${WB_FUZZ_UNSET:-" + "9" * 5000 + "}\n",
    "merge of a number": "mqtt:\n  <<: 5\n",
    "merge of a list of numbers": "mqtt:\n  <<: [5, {host: a}]\n",
    "merge of an alias to a scalar": "x: &x 5\nmqtt:\n  <<: *x\n",
    "self alias": "a: &a\n  b: *a\n",
    "undefined alias": "mqtt: *nope\n",
    "unclosed IPv6 url": "webhooks:\n  - name: w\n    url: 'https://[::1'\n",
    "bad IPv6 url": "webhooks:\n  - name: w\n    url: 'https://[zz]/x'\n",
    "port 0 url": "webhooks:\n  - name: w\n    url: 'https://a:0/x'\n",
    "superscript port": "admin:\n  listen: '127.0.0.1:²'\n",
    "bad token url": HOOK + "    auth: {type: oauth2, token_url: 'https://[::1', client_id: a,"
                            " client_secret: b}\n",
    "python tag": "!!python/object/apply:os.system ['true']\n",
    "python tag inside": "mqtt:\n  host: !!python/name:os.system\n",
    "set tag": "mqtt: !!set {a, b}\n",
    "binary tag": "mqtt:\n  password: !!binary aGVsbG8=\n",
    "bad int tag": "mqtt:\n  port: !!int abc\n",
    "bad bool tag": "mqtt:\n  embedded: !!bool maybe\n",
    "custom tag": "mqtt: !custom {a: 1}\n",
    "complex key": "? [a, b]\n: 1\n",
    "tabs": "mqtt:\n\thost: x\n",
    "duplicate keys": "mqtt:\n  host: a\n  host: b\n",
    "NUL bytes": "\x00\x01\x02",
    "escape sequences": "mqtt:\n  host: \"\\e[31m\\x9b\"\n",
    "escape sequence key": "mqtt:\n  \"\\e]0;pwned\\a\": 1\n",
    "binary garbage": bytes(range(256)) * 8,
    "not UTF-8": b"mqtt:\n  host: \xff\xfe\n",
    "UTF-16": "mqtt:\n  host: a\n".encode("utf-16"),
    "lone surrogate escape": 'mqtt:\n  host: "\\ud800"\n',
    "a list": "- a\n- b\n",
    "a scalar": "hello\n",
    "many documents": "a: 1\n---\nb: 2\n",
    "2 MB": "a: " + "x" * 2_000_000 + "\n",
    "long key": "k" * 500_000 + ": 1\n",
    "many keys": "".join(f"k{n}: {n}\n" for n in range(20_000)),
    "long url": HOOK.replace("/in", "/" + "a" * 500_000),  # long, but valid
    "deep JMESPath": HOOK + "    filter: '" + "(" * 3000 + "a" + ")" * 3000 + "'\n",
    "secret file is /dev/zero": "mqtt:\n  password_file: /dev/zero\n",
    "secret file is a directory": "mqtt:\n  password_file: /\n",
    "CA that is not a certificate": "mqtt:\n  tls: {ca_file: /etc/hostname}\n",
    "CA that is a directory": "mqtt:\n  tls: {ca_file: /}\n",
    "client key that is not a key": "mqtt:\n  tls: {cert_file: /etc/hostname, key_file:"
                                    " /etc/hostname}\n",
    "webhook CA that is not a certificate": HOOK + "    tls: {ca_file: /etc/hostname}\n",
}


ACCEPTED = {"long url"}


def check(path: Path) -> tuple[int, str, float]:
    """``webhook-bridge check -c path`` in-process: exit code, output, seconds."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["check", "-c", str(path)])
    return code, out.getvalue(), time.perf_counter() - started


def assert_located(path: Path, code: int, output: str) -> None:
    """78 and every problem line as ``file:line:column: ...``, then the count line."""
    assert code == 78, output
    *problems, summary = output.splitlines()
    assert re.fullmatch(r"\d+ configuration problems?; nothing was started", summary), output
    assert problems, output
    for line in problems:
        assert re.match(re.escape(str(path)) + r":\d+:\d+: \S", line), line
    assert "Traceback" not in output and "\x1b" not in output


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_config_is_a_located_error_within_a_second(tmp_path: Path,
                                                                name: str) -> None:
    path = tmp_path / "config.yaml"
    data = ADVERSARIAL[name]
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    check(path)  # once to warm up imports and caches, so the bound measures the check
    code, output, seconds = check(path)
    if name in ACCEPTED:
        assert code == 0, output
    else:
        assert_located(path, code, output)
    assert seconds < TIME_BOUND, f"{name}: {seconds:.2f} s"


def test_messages_say_what_is_wrong(tmp_path: Path) -> None:
    """A few of the above, word for word (where each one points matters too)."""
    expected = {
        "billion laughs": "the document expands to more than 10000 values (an alias '*name'"
                          " repeats all it refers to); simplify it",
        "5000 nested lists": "invalid YAML: ",
        "3000 nested flow maps": f"nested deeper than {MAX_DEPTH} levels; flatten it",
        "deep through aliases": f"nested deeper than {MAX_DEPTH} levels; flatten it",
        "6000-digit port": "2:9: mqtt.port: a number of 6000 characters is out of range;"
                           " give a smaller one (or quote it if it is text)",
        "quoted 6000-digit port": "2:9: mqtt.port: a number of 6000 characters is out of range",
        "merge of a number": "2:7: mqtt: a merge key '<<' takes a mapping (such as *defaults)"
                             " or a list of them; fix or remove it",
        "unclosed IPv6 url": "3:10: webhooks[0].url: the URL is malformed (Invalid IPv6 URL);"
                             " write https://host[:port]/path",
        "python tag": "1:1: unsupported YAML tag '!!python/object/apply:os.system'; remove it",
        "not UTF-8": "2:9: byte 0xff is not UTF-8 text (invalid start byte); save the file as"
                     " UTF-8",
        "huge keepalive": "2:14: mqtt.keepalive: must be at most 65535, got 70000",
        "secret file is /dev/zero": "2:18: mqtt.password_file: '/dev/zero' is not a regular"
                                    " file; give a file",
        "CA that is not a certificate": "mqtt.tls.ca_file: cannot load CA certificates from"
                                        " '/etc/hostname': no certificate in the file",
    }
    for name, text in expected.items():
        path = tmp_path / "config.yaml"
        data = ADVERSARIAL[name]
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        code, output, _ = check(path)
        assert code == 78 and text in output, (name, output)


# -- random configs ---------------------------------------------------------------------

KEYS = ["mqtt", "store", "admin", "log", "sources", "webhooks", "host", "port", "tls",
        "ca_file", "name", "url", "auth", "type", "token", "signing", "scheme", "secret",
        "batch", "max_events", "retry", "initial", "timeout", "concurrency", "topic",
        "format", "labels", "body", "headers", "filter", "<<", "listen", "max_size"]
SCALARS = st.one_of(
    st.sampled_from(["https://[::1", "https://a:0/", "10s", "1e999", "-1", "0x1F", "no",
                     "${HOME}", "$${x}", "{device_id}", "whsec_!!", "9" * 80, ".inf", ".nan",
                     "~", "bearer", "standard-webhooks", "devices/{device_id}/#"]),
    st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=30))
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner,
                                       max_size=5), max_leaves=30)
YAML_CHARS = "&*<>:{}[]!|-#%@`'\"\t\n ,?0123456789e.$\\~"


def edit(text: str, edits: list[tuple[int, int, str]]) -> str:
    for position, length, insert in edits:
        at = position % (len(text) + 1)
        text = text[:at] + insert + text[at + length % 8:]
    return text


def run_check_on(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(data)
        code, output, seconds = check(path)
    assert code in (0, 78), output
    assert "Traceback" not in output
    if code == 78:
        assert output.splitlines()[-1].endswith("nothing was started"), output
    assert seconds < TIME_BOUND, seconds


# WB_FUZZ_EXAMPLES=5000 for a longer hunt than CI's.
FUZZ = settings(max_examples=int(os.environ.get("WB_FUZZ_EXAMPLES", "150")), deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    run_check_on(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 40),
                          st.text(YAML_CHARS, max_size=6)), min_size=1, max_size=6))
def test_mutations_of_the_example(edits: list[tuple[int, int, str]]) -> None:
    run_check_on(edit(EXAMPLE, edits).encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), TREES, max_size=6))
def test_random_trees_of_known_keys(tree: dict[str, Any]) -> None:
    run_check_on(yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogatepass"))


def test_the_example_still_passes() -> None:
    """The mutations start from a valid file (else they would prove little)."""
    code, output, _ = check(ROOT / "config" / "example.yaml")
    assert code == 0, output


# -- as the operator runs it ------------------------------------------------------------

@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("name", ["billion laughs", "5000 nested lists", "6000-digit port",
                                  "unclosed IPv6 url", "CA that is not a certificate",
                                  "escape sequence key"])
def test_check_and_run_exit_78_without_traceback(tmp_path: Path, command: str,
                                                 name: str) -> None:
    path = tmp_path / "config.yaml"
    data = ADVERSARIAL[name]
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    result = run_cli(command, "-c", str(path), timeout=30)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert_located(path, result.returncode, result.stderr)


# -- the admin API refuses what check refuses, with the same words ---------------------

def yaml_message(tmp: Path, webhook_yaml: str) -> str:
    """The problem `check` reports for one webhook, without its location and list index."""
    path = tmp / "check" / "config.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("webhooks:\n  - " + webhook_yaml.replace("\n", "\n    ") + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    (line,) = error.value.problems
    message = re.sub(r"^.*?:\d+:\d+: ", "", line)
    return message.removeprefix("webhooks[0].")


async def test_api_refuses_what_check_refuses_with_the_same_message(
        tmp_path: Path, endpoint: Endpoint, certs: Certificates) -> None:
    good = {"name": "w", "url": endpoint.url + "/in", "tls": {"ca_file": str(certs.ca_file)}}
    deep: Any = "x"
    for _ in range(MAX_DEPTH + 5):
        deep = {"a": deep}
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        ({**good, "url": "https://[::1"}, "name: w\nurl: 'https://[::1'"),
        ({**good, "url": "https://a:0/"}, "name: w\nurl: 'https://a:0/'"),
        ({**good, "concurrency": 10**70}, "name: w\nurl: https://a/\nconcurrency: "
                                          + str(10**70)),
        ({**good, "concurrency": 2**40}, f"name: w\nurl: https://a/\nconcurrency: {2**40}"),
        ({**good, "tls": {"ca_file": "/etc/hostname"}},
         "name: w\nurl: https://a/\ntls: {ca_file: /etc/hostname}"),
        ({**good, "body": deep}, "name: w\nurl: https://a/\nbody: " + json.dumps(deep)),
        (b'{"name": "w", "body": ' + b"[" * 5000 + b"]" * 5000 + b"}",
         "name: w\nurl: https://a/\nbody: " + "[" * 100 + "]" * 100),
        (b'{"name": "w", "url": "https://a/", "timeout": ' + b"9" * 5000 + b"}",
         "name: w\nurl: https://a/\ntimeout: " + "9" * 5000),
    ]
    config = write_config(tmp_path, free_port(), [])
    async with running(config) as admin:
        for body, as_yaml in cases:
            expected = yaml_message(tmp_path, as_yaml)
            if isinstance(body, bytes):
                status, answer = await admin.call("POST", API, raw=body)
            else:
                status, answer = await admin.call("POST", API, body)
                with pytest.raises(ConfigError):
                    webhook_from_mapping(body, origin="api:w", sources=["telemetry"])
            assert status == 422, (answer, expected)
            messages = [re.sub(r"^api:w: ", "", e) for e in answer["errors"]]
            assert any(m.endswith(expected) for m in messages), (messages, expected)
            # The console's live validation says the same.
            if isinstance(body, bytes):
                status, answer = await admin.call("POST", "/api/v1/console/check", raw=body)
            else:
                status, answer = await admin.call("POST", "/api/v1/console/check", body)
            assert status in (200, 422), answer
            assert any(e.endswith(expected) for e in answer["errors"]), (answer, expected)
        assert not (config.parent / "conf.d").exists()


@pytest.mark.parametrize("key, value", [("keepalive", 65536), ("session_expiry", 2**32),
                                        ("concurrency", 2**31)])
def test_the_schema_knows_the_bounds(tmp_path: Path, key: str, value: int) -> None:
    """config/schema.json refuses what `check` refuses past a bound (and accepts the bound)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads((ROOT / "config" / "schema.json")
                                                      .read_text()))
    config = yaml.safe_load(EXAMPLE)
    section = config["mqtt"] if key != "concurrency" else config["webhooks"][0]
    for number, ok in ((value - 1, True), (value, False)):
        section[key] = number
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        code, output, _ = check(path)
        assert (code == 0, not list(validator.iter_errors(config))) == (ok, ok), output
