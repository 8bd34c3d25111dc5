"""Atomic files and directories, checksums, JSON manifests, and who wrote a temporary.

Every stage writes into a temporary sibling and renames it into place, so a crash or a bad input
never leaves a half-written artifact that a later stage could mistake for a finished one.

A temporary's name carries its writer: host, pid and the process's start time (`writer_tag`). Runs live
on file systems that several SLURM nodes share, so a pid alone says nothing about a temp another node
writes: a temp is stale only when its writer ran on *this* host and that process (same pid *and* start
time: pids are reused) is gone. Temps of other hosts are never removed from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smalltalk.errors import SmalltalkError

# a temp being written (.NAME.tmp-TAG) or a replaced artifact on its way out (.NAME.old-TAG)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9_.-]+)@(?P<pid>\d+)@(?P<start>\d+)"
                   r"|(?P<legacy>\d+))(?:\.[^.]*)?$")
_DIR_FSYNC_REFUSED = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EISDIR, errno.EACCES}
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), None if it does not exist;
    0 where /proc is not available (then only the pid is compared)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else (0 if pid_alive(pid) else None)
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def writer_tag(pid: int | None = None) -> str:
    """HOST@PID@START of process `pid` (default: this one), as temporary names carry it."""
    pid = os.getpid() if pid is None else pid
    return f"{_host()}@{pid}@{process_start(pid) or 0}"


def writer_alive(tag_host: str, pid: int, start: int | None) -> bool:
    """Whether the process that wrote a temp may still be writing it. Another host's writer: always (we
    cannot see its processes); here: the pid exists and, when recorded, with the same start time."""
    if tag_host != _host():
        return True
    now = process_start(pid)
    if now is None:
        return False
    return not start or not now or now == start


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_writer_alive(match: re.Match) -> bool:
    if match.group("legacy"):  # written before temps carried a host (local pid only)
        return pid_alive(int(match.group("legacy")))
    return writer_alive(match.group("host"), int(match.group("pid")), int(match.group("start")))


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories (a rename is only durable once both are)."""
    for path in sorted(Path(root).rglob("*"), reverse=True):
        if path.is_file():
            _fsync(path)
    for path in [*sorted((p for p in Path(root).rglob("*") if p.is_dir()), reverse=True), Path(root)]:
        _fsync_dir(path)


def _fsync(path: Path) -> None:
    """fsync a file; an error (EIO, ENOSPC: the data never reached the disk) propagates."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a directory; only a file system that refuses directory fsync is forgiven, never EIO/ENOSPC."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_REFUSED:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success fsync it and rename it to `final` (then fsync the
    directory), on error remove it. A kill at any moment leaves the old file or the new one, never half."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{writer_tag()}{final.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        kill_point(f"file:{final.name}")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


KILL_AT = "SMALLTALK_KILL_AT"  # tests/test_faults.py: SIGKILL this process at a named point of a write
KILLED_MARK = "SMALLTALK_KILLED_MARK"  # and say so in this file first (the process killed may be a child job)


def kill_point(name: str) -> None:
    """A real SIGKILL at a pinned moment, for the fault tests: when $SMALLTALK_KILL_AT names this point (`file:X`
    before the temp file of X is renamed into place, `dir:X` before the temp directory of X is)."""
    if os.environ.get(KILL_AT) == name:
        if os.environ.get(KILLED_MARK):
            Path(os.environ[KILLED_MARK]).write_text(f"{name} {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel, libc or file
    system cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(a))


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success fsync its contents and move it to `final`, on error
    remove it. Replacing swaps the two directories in one step where the file system can (renameat2), so
    `final` never goes missing; elsewhere the old one is renamed aside first, and if the writer dies in
    between, `remove_stale_temps` puts it back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = writer_tag()
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kill_point(f"dir:{final.name}")
    if final.exists():
        if not replace:
            shutil.rmtree(tmp)
            raise FileExistsError(final)
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old artifact
        else:
            old = final.parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that it is never seen half-deleted under its own name (a pruned checkpoint that
    kept its config but lost its weights): renamed to a temp of this writer first, in one step, then removed;
    a kill in between leaves a temp that `remove_stale_temps` deletes."""
    path = Path(path)
    if not path.is_dir():
        return
    doomed = path.parent / f".{path.name}.tmp-{writer_tag()}"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + fsync + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file + fsync + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


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


def remove_stale_temps(root: str | Path) -> list[Path]:
    """Clean up after writers that died under `root`: their temps are deleted, and an artifact they had
    renamed aside (`.NAME.old-TAG`, the two-rename fallback of atomic_dir) goes back in place if nothing
    replaced it. A temp whose writer may be alive (this host's live process, or any other host's) is left
    alone. Returns what was removed or restored. Finished artifacts are never temps, so this is safe."""
    changed = []
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts)):
        match = _TEMP.match(path.name)
        if not match or not path.exists() or _temp_writer_alive(match):
            continue
        final = path.parent / match.group("name")
        if match.group("kind") == "old" and not final.exists():
            os.replace(path, final)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        changed.append(path)
    return changed


def is_temp(path: Path) -> bool:
    """Whether `path` is a temporary of atomic_file/atomic_dir (being written, or left by a dead writer)."""
    return _TEMP.match(path.name) is not None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of an append-only JSONL log. A last line cut short (the writer died or the disk filled
    mid-append: no final newline) is dropped, as if never written; a bad line before it is an error."""
    text = Path(path).read_text(errors="replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # no newline after it: a torn append
                break
            raise SmalltalkError(f"line is not valid JSON: {line[:80]!r}", where=f"{path}:{number}",
                                 fix="delete that line (an append-only log: rows after it are intact)") from None
    return rows


def disk_error(exc: OSError) -> bool:
    """An error of the storage (full, quota, read-only, I/O), not of the program."""
    return exc.errno in DISK_ERRORS
