"""Atomic files and directories, checksums and JSON manifests.

Every stage writes into a temporary sibling and renames it into place, so a crash or a bad input
never leaves a half-written artifact that a later stage could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories (a rename is only durable once both are)."""
    for path in sorted(Path(root).rglob("*"), reverse=True):
        if path.is_file():
            _fsync(path, os.O_RDONLY)
    for path in [*sorted((p for p in Path(root).rglob("*") if p.is_dir()), reverse=True), Path(root)]:
        _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success fsync it and rename it to `final` (then fsync the
    directory), on error remove it. A kill at any moment leaves the old file or the new one, never half."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success fsync its contents and rename it to `final`, on error
    remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    if final.exists():
        if not replace:
            shutil.rmtree(tmp)
            raise FileExistsError(final)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + fsync + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_TEMP = re.compile(r"^\..+\.tmp-(\d+)")


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Delete the temp files and directories that killed processes left under `root` (their writer's pid
    is no longer alive); returns what was removed. Finished artifacts are never temps, so this is safe."""
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp-*"), key=lambda p: len(p.parts)):
        match = _TEMP.match(path.name)
        if not match or not path.exists() or pid_alive(int(match.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
