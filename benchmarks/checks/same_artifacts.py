"""Whether two run directories hold the same artifacts: a refactor or a move of the code must leave them so.

Weights (*.safetensors), token and partition files (*.bin, *.npy, *.npz) must be byte-identical; JSON and
JSONL must be equal once paths (anything naming either run's directory) and timings are dropped. Other files
(plots, HTML, logs, checkpoints' pickled trainer state) are listed as not compared. Exit 1 on any difference.

  python benchmarks/checks/same_artifacts.py RUN_A RUN_B [--ignore KEY ...]   (KEY: a JSON key one side added)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

BYTES = {".safetensors", ".bin", ".npy", ".npz"}
STRUCTURED = {".json", ".jsonl"}
VOLATILE = {"seconds", "mb_per_s", "tokens_per_s", "mfu", "time", "started", "ended", "pid", "command",
            "train_seconds", "train_mb_per_s", "timing", "peak_flops", "returncode", "error", "state", "elapsed",
            "wall_s", "samples_per_s", "tok_s", "step_time"}


def _clean(value, roots: tuple[str, ...], ignore: frozenset = frozenset()):
    if isinstance(value, dict):
        return {k: _clean(v, roots, ignore) for k, v in value.items() if k not in VOLATILE | ignore}
    if isinstance(value, list):
        return [_clean(v, roots, ignore) for v in value]
    if isinstance(value, str) and any(r in value for r in roots):
        return "<path>"
    return value


def _structured(path: Path, roots: tuple[str, ...], ignore: frozenset):
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else [json.loads(text)]
    return [_clean(r, roots, ignore) for r in rows]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(a: Path, b: Path, ignore: frozenset = frozenset()) -> tuple[list[str], int, int]:
    """(differences, files compared, files not compared)."""
    roots = tuple(str(p) for r in (a, b) for p in {r, r.resolve()})
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "tensorboard" not in p.parts}
    differences = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    differences += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    compared = skipped = 0
    for rel in sorted(files_a & files_b):
        if rel.suffix in BYTES:
            same = _digest(a / rel) == _digest(b / rel)
        elif rel.suffix in STRUCTURED:
            same = _structured(a / rel, roots, ignore) == _structured(b / rel, roots, ignore)
        else:
            skipped += 1
            continue
        compared += 1
        if not same:
            differences.append(f"differs: {rel}")
    return differences, compared, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore", nargs="*", default=[], help="JSON keys to drop as well (say which in a report)")
    args = ap.parse_args()
    differences, compared, skipped = compare(args.a, args.b, frozenset(args.ignore))
    print("\n".join(differences) if differences else "same artifacts")
    print(f"{compared} files compared, {skipped} not compared (plots, HTML, logs, pickled trainer state)"
          + (f"; keys ignored: {', '.join(args.ignore)}" if args.ignore else ""))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
