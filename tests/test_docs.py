"""The docs' citations can fail: every `test_FILE.py::test_NAME` that README.md or docs/ cite as proof names a
test function that exists in tests/ (a renamed or deleted test turns its claim into an unproven one)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"(test_\w+\.py)::(test_\w+)")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_cited_test_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    cited = {(page.relative_to(ROOT), file, name)
             for page in pages for file, name in CITATION.findall(page.read_text())}
    assert len(cited) > 100  # reliability.md and serving.md cite their tests
    defined = {path.name: _tests_in(path) for path in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(f"{page}: {file}::{name}" for page, file, name in cited if name not in defined.get(file, set()))
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)
