"""docs/plugins.md's tutorial, followed literally: its ``tutorial:`` code blocks written to
files, a fresh virtualenv (no system site-packages) with mtrremu installed from this source
tree, the tutorial's distribution installed into it, then the tutorial's commands run: the
strategy must be listed by ``mtrremu strategies`` and compared by ``mtrremu ab``.

Slow (a virtualenv and two package builds): it runs in the ci profile only."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROFILE, ROOT, run_command

BLOCK = re.compile(r"^```\w+ tutorial:(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def tutorial_blocks() -> dict[str, str]:
    return {name: text for name, text in BLOCK.findall((ROOT / "docs/plugins.md").read_text())}


def test_the_tutorial_has_its_files_and_commands() -> None:
    blocks = tutorial_blocks()
    assert sorted(blocks) == ["commands", "pyproject.toml", "tutorial_slots.py"]
    assert "mtrremu strategies" in blocks["commands"]


@pytest.mark.skipif(PROFILE != "ci", reason="slow (fresh virtualenv): MTRREMU_TEST_PROFILE=ci")
def test_following_the_tutorial_gives_a_listed_and_compared_strategy(tmp_path: Path) -> None:
    blocks = tutorial_blocks()
    project = tmp_path / "mtrremu-tutorial-slots"
    project.mkdir()
    for name in ("pyproject.toml", "tutorial_slots.py"):
        (project / name).write_text(blocks[name])
    venv = tmp_path / "venv"
    done = run_command(sys.executable, "-m", "venv", str(venv))
    assert done.returncode == 0, done.stderr
    pip = str(venv / "bin/pip")
    done = run_command(pip, "install", "-q", str(ROOT), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = []
    for line in blocks["commands"].splitlines():
        argv = shlex.split(line)
        argv[0] = str(venv / "bin" / argv[0])
        done = subprocess.run(
            argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
        )
        assert done.returncode == 0, f"{line}: {done.stdout}{done.stderr}"
        outputs.append(done.stdout)
    listing, comparison = outputs[1], outputs[2]
    listed = r"^tutorial-slots\s+profile 6\.7\s+mtrremu-tutorial-slots 0\.1\.0"
    assert re.search(listed, listing, re.MULTILINE), listing
    assert "tutorial-slots" in comparison and "fine-grained" in comparison
