"""The README's two commands: CI runs the same test command."""

from __future__ import annotations

import sys

from tests.helpers import ROOT, run_command


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```sh"
    end = lines.index("```", 1)
    return lines[1:end]


def test_the_readme_starts_with_exactly_two_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert all(c.startswith("python3 -m venv .venv && ") for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_the_readme_results_are_the_default_job_s() -> None:
    done = run_command(sys.executable, "scripts/readme_results.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
