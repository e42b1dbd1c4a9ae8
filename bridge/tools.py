"""Operator tools: ``test``, ``secret``, ``listen`` and ``demo`` (being written)."""

from __future__ import annotations

import argparse


def cmd_test(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_secret(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_listen(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError
