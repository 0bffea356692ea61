"""The dependency directions of docs/architecture.md#dependency-directions, checked on the source.

core imports numpy and the standard library only; plugins reach the core only through the
plugin API; nothing imports the CLI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def imports(path: Path) -> set[str]:
    """Every module name a file imports (absolute names only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("mtrremu/core"), ids=lambda p: p.name)
def test_core_imports_only_numpy_the_stdlib_and_itself(path: Path) -> None:
    for name in imports(path):
        top = name.split(".")[0]
        assert top in {"numpy", "mtrremu", "__future__"} or _stdlib(top), f"{path}: {name}"
        if top == "mtrremu":
            assert name.startswith("mtrremu.core"), f"{path} imports {name}"


@pytest.mark.parametrize(
    "path", [p for p in sources("plugins") if "tests" not in p.parts], ids=lambda p: p.name
)
def test_builtin_strategies_use_only_the_plugin_api(path: Path) -> None:
    for name in imports(path):
        if name.split(".")[0] == "mtrremu":
            assert name == "mtrremu.plugin", f"{path} imports {name}"


def test_nothing_imports_the_cli() -> None:
    """Only ``python -m mtrremu`` (``__main__.py``) runs it."""
    for path in [*sources("mtrremu"), *sources("plugins")]:
        if path.name not in ("cli.py", "__main__.py"):
            assert "mtrremu.cli" not in imports(path), path


def _stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names


def test_the_mutants_are_plugins_like_any_other() -> None:
    """They reach the emulator through the plugin API and derive from the built-ins."""
    for name in imports(ROOT / "mtrremu/testing/mutants.py"):
        top = name.split(".")[0]
        if top == "mtrremu":
            assert name == "mtrremu.plugin", f"mutants.py imports {name}"
        else:
            assert top in {"mtrremu_strategies", "__future__"} or _stdlib(top), name


@pytest.mark.parametrize("path", sources("mtrremu/testing"), ids=lambda p: p.name)
def test_the_testing_kit_needs_only_pytest_and_hypothesis_besides_mtrremu(path: Path) -> None:
    """The conformance suite runs in an author's environment: mtrremu and its testing extra."""
    allowed = {"mtrremu", "mtrremu_strategies", "pytest", "hypothesis", "__future__"}
    for name in imports(path):
        assert name.split(".")[0] in allowed or _stdlib(name.split(".")[0]), f"{path}: {name}"
