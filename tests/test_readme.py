"""The README: its two commands (CI runs the same test command), its results and its examples."""

from __future__ import annotations

import sys

from tests.helpers import ROOT, run_command, serving


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


def python_block(section: str) -> str:
    """The first ```python block of a README section."""
    text = (ROOT / "README.md").read_text().split(f"## {section}\n", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_in_process_example_runs() -> None:
    done = run_command(sys.executable, "-c", python_block("Using it from Python"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "kind=<AccessKind.FAULT" in lines[0]
    assert "MTRRphysBase0" in lines[1]  # the guest #GP's reason


def test_the_grpc_example_runs_against_a_live_server() -> None:
    code = python_block("Serving over gRPC")
    assert '"127.0.0.1:50051"' in code
    with serving("127.0.0.1:0") as server:
        (address,) = server.addresses
        done = run_command(sys.executable, "-c", code.replace("127.0.0.1:50051", address))
    assert done.returncode == 0, done.stderr
    assert "MTRRphysBase0" in done.stdout.splitlines()[0]
