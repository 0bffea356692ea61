"""Build hook: generate the gRPC stubs from ``protos/`` before packaging (never committed).

The stubs go next to the sources (``mtrremu/v1/``), so editable installs see them too.
"""

from __future__ import annotations

import shutil
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def generate_stubs() -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    mypy = shutil.which("protoc-gen-mypy") or str(bindir / "protoc-gen-mypy")
    mypy_grpc = shutil.which("protoc-gen-mypy_grpc") or str(bindir / "protoc-gen-mypy_grpc")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{files('grpc_tools') / '_proto'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--plugin=protoc-gen-mypy={mypy}",
        f"--mypy_out={ROOT}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
        f"--mypy_grpc_out={ROOT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the gRPC stubs")


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
