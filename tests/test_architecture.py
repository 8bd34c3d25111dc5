"""The rules docs/architecture.md states, checked on the source: one owner of run-file names, no import
cycles, small modules, one verb module per stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "smalltalk"
RUN_FILE = re.compile(r"""["'][\w./-]*\.(json|jsonl|npy|npz|pkl|pt|safetensors|bin|md|html|png|log|sbatch)["']""")
INPUT_FORMATS = {"data/ingest.py", "sft/examples.py"}  # the formats of users' documents and instruction files


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """smalltalk modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smalltalk"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("smalltalk"))
    return found & set(modules)


def test_only_layout_spells_run_file_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("layout/") or rel in INPUT_FORMATS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if RUN_FILE.search(code) and not code.strip().startswith(('"""', "'")):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "run-file names belong in layout/:\n" + "\n".join(offenders)


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for dep in graph.get(node, ()):
                if dep == goal:
                    return True
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if reaches(b, a)})
    assert not cycles, f"import cycles: {cycles}"


def test_modules_stay_small():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these by idea: {long}"


def test_every_verb_module_registers_its_commands():
    from smalltalk.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)  # argparse keeps them only here
    assert {"tokenizer", "data", "corpus", "routers", "partition", "experts", "dense", "train", "eval", "report",
            "model", "sft", "generate", "export", "serve", "run", "plan", "launch", "status"} == verbs
    for path in (PACKAGE / "commands").glob("*.py"):
        if path.stem not in ("__init__", "common"):
            assert "def register(sub" in path.read_text(), path.name
