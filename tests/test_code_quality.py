"""The repository stays ruff- and ``mypy --strict``-clean (the checks CI relies on)."""

from __future__ import annotations

import sys

from tests.helpers import run_command


def check(*command: str) -> None:
    done = run_command(sys.executable, "-m", *command, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_lint() -> None:
    check("ruff", "check", ".")


def test_ruff_format() -> None:
    check("ruff", "format", "--check", ".")


def test_mypy_strict() -> None:
    check("mypy")
