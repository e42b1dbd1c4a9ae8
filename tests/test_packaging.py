"""What an install pulls in (setup.cfg): the embedded broker only with the ``broker``
extra (the ``test`` extra pulls it), cbor2 kept below 6 on 32-bit ARM, where cbor2 6
(Rust-only) has no wheel; the scripts install what 32-bit ARM needs to compile."""

from __future__ import annotations

import configparser

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from .support import ROOT

SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")


def _requirements(text: str) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


INSTALL = _requirements(SETUP["options"]["install_requires"])
EXTRAS = {name: _requirements(value) for name, value in SETUP["options.extras_require"].items()}


def _for(machine: str, name: str) -> list[SpecifierSet]:
    env = {"platform_machine": machine}
    return [r.specifier for r in INSTALL
            if r.name == name and (r.marker is None or r.marker.evaluate(env))]


def test_the_broker_is_an_extra_that_tests_pull() -> None:
    assert "amqtt" not in {r.name for r in INSTALL}
    assert [r.name for r in EXTRAS["broker"]] == ["amqtt"]
    assert any(r.name == "mqtt-webhook-bridge" and r.extras == {"broker"}
               for r in EXTRAS["test"])


@pytest.mark.parametrize("machine", ["armv6l", "armv7l", "armv8l"])
def test_cbor2_below_6_on_32_bit_arm(machine: str) -> None:
    (spec,) = _for(machine, "cbor2")
    assert "5.9.0" in spec and "6.0.0" not in spec


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_cbor2_unbounded_elsewhere(machine: str) -> None:
    (spec,) = _for(machine, "cbor2")
    assert "6.3.0" in spec and "5.5.0" not in spec


def test_scripts_show_pip_output_and_handle_32_bit_arm() -> None:
    common = (ROOT / "scripts" / "_common.sh").read_text()
    assert "pip install -q" not in common
    assert "apt_install build-essential python3-dev libffi-dev" in common
    assert '"cbor2>=5.6,<6"' in common
    assert 'make_venv ".[broker]"' in (ROOT / "scripts" / "quickstart.sh").read_text()
    assert 'make_venv ".[test]"' in (ROOT / "scripts" / "test.sh").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    assert "build-essential libffi-dev" in docker
