"""Module seams: the store commands load no delivery stack, and the admin server does not
import the daemon."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

from .support import ROOT

HEAVY = ("aiohttp", "bridge.http1", "bridge.delivery", "bridge.dispatch", "bridge.daemon",
         "bridge.admin", "bridge.tools", "bridge.receiver")


def test_status_loads_no_delivery_stack(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "store": {"path": str(tmp_path / "queue.db")},
        "sources": [{"name": "t", "topic": "d/{device_id}", "format": "json"}],
        "webhooks": [{"name": "w", "url": "https://example.com/x"}],
    }))
    script = ("import sys\nfrom bridge import cli\n"
              f"code = cli.main(['status', '-c', {str(config)!r}])\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert done.stdout.splitlines()[1].startswith("w ")


def _imports(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bridge."):
            names.add(node.module.removeprefix("bridge."))
    return names


def test_admin_server_does_not_import_the_daemon() -> None:
    """Not even for type checking: it sees the bridge through bridge.control."""
    assert "daemon" not in _imports(ROOT / "bridge" / "admin.py")
    assert "daemon" not in _imports(ROOT / "bridge" / "control.py")
