"""The documentation in docs/ is the reference the code, the proto and the tests point to.

Every ``docs/<file>.md#<section>`` reference anywhere in the repository (and every relative link
between the docs) must name a file and a heading that exist; nothing may point to a document
that is not in the repository; and the reference pages cover every counter, tracking count,
error reason, operation and limit the code defines.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from mtrremu.core import config
from mtrremu.core.errors import BY_REASON
from mtrremu.core.operations import OPERATIONS
from mtrremu.core.oracle import STALENESS_COUNTS
from mtrremu.server.limits import Limits
from mtrremu.v1 import emulator_pb2 as pb
from mtrremu.workloads.trace import TraceFormatError
from tests.helpers import ROOT

DOCS = ROOT / "docs"
#: Where references to the docs may appear.
SOURCES = ("mtrremu", "plugins", "protos", "tests", "scripts", "clients/node", "docs", ".ci")
SUFFIXES = {".py", ".proto", ".md", ".mjs", ".json", ".toml", ".yaml", ""}
REFERENCE = re.compile(r"docs/([\w./-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\]\((?!https?:)([\w./-]*\.md)?(?:#([\w-]+))?\)")
#: Documents that are not in the repository: nothing may name them.
FOREIGN = re.compile(r"(?<!docs/)\b(?:semantics|engineering|workloads)\.md|shared/(?:spec|seeds)")


def text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            if (
                path.is_file()
                and path.suffix in SUFFIXES
                and "node_modules" not in path.parts
                and "__pycache__" not in path.parts
                and path.name not in ("package-lock.json",)
            ):
                files.append(path)
    return files


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(doc: Path) -> frozenset[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", doc.read_text(), flags=re.MULTILINE)
    return frozenset(slug(h) for h in headings)


def references() -> list[tuple[Path, str, str | None]]:
    """Every (referring file, referenced doc relative to docs/, anchor or None)."""
    found = []
    for path in text_files():
        text = path.read_text(errors="replace")
        for match in REFERENCE.finditer(text):
            found.append((path, match.group(1), match.group(2)))
        if path.suffix == ".md" and path.parent == DOCS:
            for match in LINK.finditer(text):
                target = match.group(1) or path.name
                found.append((path, target, match.group(2)))
    return found


#: The documents a user must find in docs/, by path in the repository.
REQUIRED_DOCS = tuple(
    f"docs/{topic}.md"
    for topic in ("api", "counters", "semantics", "oracle", "timing", "vmm-guide", "architecture")
)


def test_the_docs_exist_and_the_readme_links_them() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in REQUIRED_DOCS:
        assert (ROOT / path).is_file(), path
        assert path in readme, path


def test_every_referenced_doc_section_exists() -> None:
    found = references()
    assert len(found) > 30  # the code does point into the docs
    broken = []
    for path, name, anchor in found:
        doc = DOCS / name
        where = f"{path.relative_to(ROOT)} -> docs/{name}{'#' + anchor if anchor else ''}"
        if not doc.is_file():
            broken.append(f"{where}: no such document")
        elif anchor is not None and anchor not in anchors(doc):
            broken.append(f"{where}: no such section")
    assert not broken, "\n".join(broken)


def test_nothing_refers_to_a_document_outside_the_repository() -> None:
    offending = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in text_files()
        if path != Path(__file__)
        for match in FOREIGN.finditer(path.read_text(errors="replace"))
        # Inside docs/ a bare name is a sibling (its links are checked above).
        if not (path.parent == DOCS and (DOCS / match.group(0)).is_file())
    ]
    assert not offending, "\n".join(offending)


def doc_text(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("counters.md", [f.name for f in pb.Counters.DESCRIPTOR.fields]),
        ("counters.md", [f.name for f in pb.ZapSummary.DESCRIPTOR.fields]),
        ("counters.md", [f.name for f in pb.LeafCounts.DESCRIPTOR.fields]),
        ("counters.md", [f.name for f in pb.FaultRangeOutcome.DESCRIPTOR.fields]),
        ("oracle.md", list(STALENESS_COUNTS)),
        ("oracle.md", [f.name for f in pb.StalenessTracking.DESCRIPTOR.fields]),
    ],
)
def test_every_count_is_defined(name: str, fields: list[str]) -> None:
    text = doc_text(name)
    missing = [field for field in fields if f"`{field}`" not in text]
    assert not missing, f"docs/{name} does not define {missing}"


def test_every_error_reason_is_documented_with_its_status() -> None:
    text = doc_text("api.md")
    reasons = {reason: cls.status for reason, cls in BY_REASON.items() if reason != "MTRREMU_ERROR"}
    reasons[TraceFormatError.reason] = TraceFormatError.status
    errors = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    missing = [r for r in reasons if f"`{r}`" not in errors]
    assert not missing, f"docs/api.md#errors does not document {missing}"
    for status in set(reasons.values()):
        assert status in errors, status


def test_every_operation_and_limit_is_documented() -> None:
    text = doc_text("api.md")
    for kind in OPERATIONS:
        assert kind.rpc in text and f"`{kind.name}`" in text, kind.name
    limits = text.split("## Limits", 1)[1].split("\n## ", 1)[0]
    defaults = Limits()
    for flag, value in (
        ("--max-vms", f"{defaults.max_vms}"),
        ("--max-vm-memory", "16 TiB"),
        ("--max-total-memory", "32 TiB"),
        ("--max-batch-operations", f"{defaults.max_batch_operations:,}"),
        ("--max-message-bytes", "64 MiB"),
    ):
        assert flag in limits, flag
        assert value in limits, (flag, value)
    for most in (config.MAX_MEMSLOTS, config.MAX_MEMSLOT_NAME, config.MAX_DMA_DEVICES):
        assert f"{most:,}" in limits or str(most) in limits, most
    assert "4 MiB" in limits and "1 MiB" in text
