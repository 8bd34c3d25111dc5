"""The rules docs/architecture.md states, checked on the source: one owner of run-file names, no import
cycles, small modules, one verb module per stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "smalltalk"
RUN_FILE = re.compile(r"""["'][\w./-]*\.(json|jsonl|npy|npz|pkl|pt|safetensors|bin|md|html|png|log|sbatch)["']""")
# the formats of users' documents and instruction files, and the files inside the packages corpus10 reads
INPUT_FORMATS = {"data/ingest.py", "sft/examples.py", "data/corpora/sources.py"}


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


def _back_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges a -> b of `graph` from which a can be reached again: the edges of its cycles."""
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if reaches(b, a)})


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    cycles = _back_edges(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_stay_small():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these by idea: {long}"


def test_every_verb_module_registers_its_commands():
    from smalltalk.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)  # argparse keeps them only here
    assert {"tokenizer", "data", "corpus", "routers", "partition", "trunk", "experts", "dense", "train", "eval",
            "report", "model", "sft", "generate", "export", "serve", "run", "plan", "launch", "status"} == verbs
    for path in (PACKAGE / "commands").glob("*.py"):
        if path.stem not in ("__init__", "common"):
            assert "def register(sub" in path.read_text(), path.name


def test_packages_by_stage_leave_few_modules_at_the_root():
    """Issue #29: training/, routing/, mixture/, run/, data/, serving/, sft/, commands/, layout/ each say in
    their __init__ what they own; the root keeps the shared basics only."""
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 12, root
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"{package.name}/__init__.py"


def test_one_module_is_named_for_eval():
    """One eval stage; the NLL helpers, the tally and the lm-eval adapter are named for what they are (the
    `eval` verb's module in commands/ is named for the verb)."""
    named = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if "eval" in p.stem and p.parent.name != "commands"]
    assert named == ["evaluation/eval_stage.py"], named


def test_library_code_never_starts_the_cli():
    """Only cli.py and commands/ import the CLI; only run/ (the orchestration) and commands/ import the
    launcher that starts `smalltalk` processes."""
    modules = _modules()
    for name, path in modules.items():
        imported = _imports(path, modules)
        if not (name.startswith("smalltalk.commands") or name == "smalltalk.cli"):
            assert not {m for m in imported if m == "smalltalk.cli" or m.startswith("smalltalk.commands")}, name
        if not name.startswith(("smalltalk.run", "smalltalk.commands")):
            assert "smalltalk.run.launch" not in imported, name


def test_the_training_path_is_decided_in_one_place():
    """training/paths.py chooses; the CPU kernels are imported by the CPU path (training/forward.py) and each
    other only; glibc's malloc thresholds are set by batch passes, never by the CLI or the server."""
    modules = _modules()
    importers = {name for name, path in modules.items()
                 if any(m.startswith("smalltalk.training.cpu") for m in _imports(path, modules))}
    assert importers <= {"smalltalk.training.forward"} | {m for m in modules if m.startswith("smalltalk.training.cpu")}
    chooser = {name for name, path in modules.items() if "choose_forward(" in path.read_text()}
    assert chooser == {"smalltalk.training.paths", "smalltalk.training.trainer"}, chooser
    malloc = {name for name, path in modules.items() if "keep_freed_memory()" in path.read_text()}
    assert malloc == {"smalltalk.training.host_memory", "smalltalk.training.trainer", "smalltalk.routing.partition",
                      "smalltalk.evaluation.eval_stage"}, malloc


def test_packages_depend_one_way():
    """No package (or root module) imports from a package that imports from it: stages build on earlier
    ones (data, training, routing, mixture, run, commands), never back."""
    modules = _modules()

    def unit(name: str) -> str:
        parts = name.split(".")
        return parts[1] if modules[name].name == "__init__.py" or len(parts) > 2 else name

    edges = {(unit(a), unit(b)) for a, path in modules.items() for b in _imports(path, modules)
             if unit(a) != unit(b)}
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    back = _back_edges(graph)
    assert not back, back


def test_no_private_names_cross_a_package():
    """A module imports another package's public names only: what starts with _ is its owner's business."""
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        package = (name.split(".") + [""])[1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smalltalk."):
                other = node.module.split(".")[1]
                private = [a.name for a in node.names if a.name.startswith("_")]
                if other != package and private:
                    offenders.append(f"{name}: {node.module} {private}")
    assert not offenders, offenders
