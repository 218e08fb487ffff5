"""The design notes in docs/ stay true to the code that cites them: every `§` reference in the repository
names a page of docs/ and a section that page has, no comment cites a document outside the repository, the
pages' relative links resolve, and every `rvr` command in their bash blocks parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server.cli import TRAINING_COMMANDS, build_parser, run_training_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".conf", ".toml", ".sh", ".cfg", ".ini", ".txt"}
SKIP_DIRS = {".git", ".venv", "node_modules", "assets", "__pycache__", "runs", "out"}
# Design documents that live outside this repository; code must cite docs/ instead.
OUTSIDE = re.compile(
    r"bagel-model\.md|serving-design|kernel-design|compile-backends|style\.md|shared/specs|(?<!docs/)\brvr\.md"
)
SECTION = r"§\d+(?:\.\d+)*"
CODE_REF = re.compile(rf"docs/([\w-]+)\.md((?:[\s,]*(?:and\s+)?{SECTION})+)")
DOC_REF = re.compile(rf"(?:\[?([\w-]+)\.md\]?(?:\([\w./#-]+\))?\s+)?({SECTION})")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _repo_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name == "Dockerfile":
            out.append(path)
    return sorted(out)


def _sections(page: str) -> set[str]:
    path = DOCS / f"{page}.md"
    return set(HEADING.findall(path.read_text())) if path.is_file() else set()


def _code_files() -> list[Path]:
    return [p for p in _repo_files() if DOCS not in p.parents and p != Path(__file__)]


def test_code_references_point_at_existing_sections():
    problems, total = [], 0
    for path in _code_files():
        text = path.read_text(errors="replace")
        count = text.count("§")
        if not count:
            continue
        rel = path.relative_to(ROOT)
        matched = 0
        for m in CODE_REF.finditer(text):
            for sec in re.findall(SECTION, m.group(2)):
                matched += 1
                if sec[1:] not in _sections(m.group(1)):
                    problems.append(f"{rel}: docs/{m.group(1)}.md has no {sec}")
        if matched != count:
            problems.append(f"{rel}: {count - matched} § reference(s) without a docs/NAME.md before them")
        total += count
    assert not problems, "\n".join(problems)
    assert total >= 45  # the code's references (comments, docstrings, deploy files) are all checked


def test_no_reference_to_documents_outside_the_repository():
    hits = []
    for path in _code_files():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_doc_sections_and_links_resolve(page):
    path = DOCS / page
    text = path.read_text()
    problems = []
    for m in DOC_REF.finditer(text):
        target = m.group(1) or path.stem
        if m.group(2)[1:] not in _sections(target):
            problems.append(f"{target}.md has no {m.group(2)} (cited in {page})")
    for link in LINK.findall(text):
        if link.startswith(("http://", "https://", "#")):
            continue
        if not (path.parent / link.split("#", 1)[0]).exists():
            problems.append(f"{page}: broken link {link}")
    assert not problems, "\n".join(problems)


def test_every_page_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert {p for p in pages if f"]({p})" not in index} == set()


def _doc_commands() -> list[tuple[str, str]]:
    lines = []
    for path in sorted(DOCS.glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].strip()
                if line.startswith("rvr "):
                    lines.append((path.name, line))
    return lines


@pytest.mark.parametrize(("page", "line"), _doc_commands())
def test_doc_commands_parse(page, line, capsys):
    argv = shlex.split(line)[1:]
    if argv[0] in TRAINING_COMMANDS:  # parsed by their own module: every flag shown must be in its --help
        assert run_training_command(argv[0], ["--help"]) == 0
        usage = capsys.readouterr().out
        assert all(a in usage for a in argv[1:] if a.startswith("--")), (page, line)
        return
    build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown command or flag
