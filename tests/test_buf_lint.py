"""The API protos stay ``buf lint`` clean (buf.yaml at the repo root: lint STANDARD).

buf comes from npm (``@bufbuild/buf``, a devDependency of clients/node; its launcher is a Node
script). Skipped without ``node`` or ``npm ci --prefix clients/node`` unless
``MTRREMU_REQUIRE_NODE=1`` (CI), which turns a missing toolchain into a failure.
"""

from __future__ import annotations

from tests.helpers import ROOT, require_node_toolchain, run_command

BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"


def test_buf_lint_is_clean() -> None:
    require_node_toolchain(BUF)
    assert (ROOT / "buf.yaml").is_file()
    done = run_command(str(BUF), "lint")
    assert done.returncode == 0, f"buf lint exited {done.returncode}:\n{done.stdout}{done.stderr}"
    assert done.stdout.strip() == "", done.stdout


def test_buf_builds_the_module() -> None:
    """Lint passing on an empty module would prove nothing: the image must hold the service."""
    require_node_toolchain(BUF)
    done = run_command(str(BUF), "ls-files")
    assert done.returncode == 0, done.stderr
    assert "protos/mtrremu/v1/emulator.proto" in done.stdout.split()
