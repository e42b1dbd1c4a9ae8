#!/usr/bin/env bash
# Install what the tests need (Debian's mosquitto, the Python packages in ./.venv), then
# run ruff and the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_common.sh"
apt_install mosquitto systemd chromium chromium-driver fonts-dejavu-core
make_venv ".[test]"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
