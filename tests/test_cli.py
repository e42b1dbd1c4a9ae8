"""The command line: ``-c`` before or after the command, the config lookup, help texts,
and ``status`` within 100 columns (SPEC §6)."""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from bridge.cli import STATUS_WIDTH, _ellipsis, build_parser, status_table

from .support import ROOT, run_cli, temp_dir

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("WEBHOOK_BRIDGE_CONFIG", None)


def _config(tmp: Path, names: tuple[str, ...] = ("w",)) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "store": {"path": str(tmp / "queue.db")},
        "sources": [{"name": "t", "topic": "d/{device_id}"}],
        "webhooks": [{"name": n, "url": "https://example.com/x"} for n in names],
    }))
    return path


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_config_before_or_after_the_command_or_from_the_environment(where: str) -> None:
    path = _config(temp_dir())
    args = {"before": ["-c", str(path), "check"], "after": ["check", "-c", str(path)],
            "env": ["check"]}[where]
    env = {**ENV, "WEBHOOK_BRIDGE_CONFIG": str(path)} if where == "env" else ENV
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok (1 sources, 1 webhooks)\n"


def test_config_after_the_command_wins_over_before() -> None:
    good = _config(temp_dir())
    result = run_cli("-c", "/nonexistent.yaml", "check", "--config", str(good), env=ENV)
    assert result.returncode == 0, result.stderr
    parsed = build_parser().parse_args(["-c", "a.yaml", "status"])
    assert parsed.config == "a.yaml"
    assert build_parser().parse_args(["status"]).config is None


def test_missing_default_config_names_both_ways_to_give_one() -> None:
    result = run_cli("status", env=ENV)
    assert result.returncode == 78
    assert ("/etc/webhook-bridge/config.yaml: cannot read the config file: No such file or "
            "directory; check the path (-c PATH or WEBHOOK_BRIDGE_CONFIG)") in result.stderr


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_command_and_option_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values()), helps
    for name, command in sub.choices.items():
        assert command.description, name
        for action in _actions(command):
            assert action.help, f"{name} {action.option_strings or action.dest}"
    result = run_cli("status", "--help", env=ENV)
    assert result.returncode == 0 and "--wide" in result.stdout and "-c PATH" in result.stdout


def _row(name: str, error: str | None, state: str = "DISABLED_DUE_TO_ERRORS",
         big: int = 9_999_999) -> dict[str, object]:
    return {"name": name, "configured": True, "state": state, "queued": big,
            "in_flight": 999_999, "delivered": 999_999_999, "failed": 999_999, "dead": 99_999,
            "dropped": 1234, "attempts": 99_999_999, "consecutive_failures": 99_999,
            "last_triggered": int((time.time() - 7200) * 1000), "last_error": error}


LONG_ERROR = ("HTTP 503 Service Unavailable: upstream connect error or disconnect/reset "
              "before headers. reset reason: connection termination, retried 12 times by "
              "the load balancer in front of api.example.com")


def test_status_fits_100_columns_with_an_ellipsis() -> None:
    rows = [_row("a-rather-long-webhook-name-for-plant-7", LONG_ERROR), _row("ok", None)]
    lines = status_table(rows, wide=False, now=time.time())
    assert all(len(line) <= STATUS_WIDTH for line in lines), [len(x) for x in lines]
    assert lines[0].split() == ["WEBHOOK", "STATE", "QUEUED", "FLIGHT", "DELIVERED",
                                "FAILED", "DEAD", "ATTEMPTS", "FAILS", "LAST"]
    assert lines[1].split() == ["a-rather-long-web…", "DISABLED_DUE_TO_ERRORS", "9999999",
                                "999999", "999999999", "999999", "99999", "99999999",
                                "99999", "2h"]
    error_line = lines[2]
    assert error_line.startswith("  last error: HTTP 503 Service Unavailable: upstream")
    assert error_line.endswith("…")
    # Cut at a word boundary: what precedes the ellipsis is a whole word of the error.
    assert error_line[len("  last error: "):-1].split()[-1] in LONG_ERROR.split()
    assert lines[3].startswith("ok ") and len(lines) == 4  # no error line without an error


def test_status_wide_shows_everything() -> None:
    rows = [_row("a-rather-long-webhook-name-for-plant-7", LONG_ERROR)]
    lines = status_table(rows, wide=True, now=time.time())
    assert len(lines) == 2
    assert lines[0].split()[-5:] == ["DROPPED", "LAST", "TRIGGERED", "LAST", "ERROR"]
    assert lines[1].startswith("a-rather-long-webhook-name-for-plant-7 DISABLED_DUE_TO_ERRORS")
    assert lines[1].endswith("  " + LONG_ERROR)
    assert " 1234 " in lines[1]


def test_ellipsis() -> None:
    assert _ellipsis("short", 10) == "short"
    assert _ellipsis("one two\nthree", 20) == "one two three"
    assert _ellipsis("alpha beta gamma delta", 12) == "alpha beta…"
    assert _ellipsis("x" * 30, 10) == "x" * 9 + "…"


def test_status_command_output_width() -> None:
    tmp = temp_dir()
    path = _config(tmp, ("cloud-ingest", "x"))
    assert run_cli("status", "-c", str(path), env=ENV).returncode == 0  # creates the store
    with sqlite3.connect(tmp / "queue.db") as conn:
        conn.execute("INSERT OR REPLACE INTO webhooks (name, state, last_error) VALUES "
                     "('cloud-ingest', 'ENABLED', ?)", (LONG_ERROR,))
    result = run_cli("-c", str(path), "status", env=ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= STATUS_WIDTH
    assert lines[1].startswith("cloud-ingest ") and lines[2].endswith("…")
    wide = run_cli("-c", str(path), "status", "--wide", env=ENV).stdout
    assert LONG_ERROR in wide
