"""The API protos stay ``buf lint`` clean (buf.yaml at the repo root: lint STANDARD).

buf comes from npm (``@bufbuild/buf``, a devDependency of clients/node; its launcher is a Node
script). Skipped without ``node`` or ``npm ci --prefix clients/node`` unless
``MTRREMU_REQUIRE_NODE=1`` (CI), which turns a missing toolchain into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_command

BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"


def require_buf() -> Path:
    """The npm-installed buf; skip (or fail with ``MTRREMU_REQUIRE_NODE=1``) without it."""
    missing = []
    if shutil.which("node") is None:
        missing.append("`node` is not on PATH")
    if not BUF.exists():
        missing.append(f"{BUF.relative_to(ROOT)} is missing (run `npm ci --prefix clients/node`)")
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("MTRREMU_REQUIRE_NODE") == "1":
            pytest.fail(f"MTRREMU_REQUIRE_NODE=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return BUF


def test_buf_lint_is_clean() -> None:
    buf = require_buf()
    assert (ROOT / "buf.yaml").is_file()
    done = run_command(str(buf), "lint")
    assert done.returncode == 0, f"buf lint exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert done.stdout.strip() == "", done.stdout


def test_buf_builds_the_module() -> None:
    """Lint passing on an empty module would prove nothing: the image must hold the service."""
    buf = require_buf()
    done = run_command(str(buf), "ls-files")
    assert done.returncode == 0, done.stderr
    assert "protos/mtrremu/v1/emulator.proto" in done.stdout.split()
