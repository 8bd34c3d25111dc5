"""Training checkpoints: HF weights (safetensors) + optimizer, scheduler, RNG and data cursor.

A checkpoint directory appears only complete (temp dir + rename). Damage done afterwards (a truncated
file) is reported with the path and the way out, instead of a stack trace from deep inside torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, remove_stale_temps, remove_tree
from smalltalk.layout import STEP_DIR, TRAINER_STATE, WEIGHTS, TrainFiles
from smalltalk.llama import quiet_transformers


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """The finished checkpoints, oldest first. Read-only: `smalltalk status` calls this while a trainer
    writes, so a save in progress is never touched here (the trainer cleans up after dead writers)."""
    root = TrainFiles(Path(out_dir)).checkpoints
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def load_latest_good(out_dir: str | Path, model: torch.nn.Module,
                     verbose: bool = True) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, into `model`; a damaged newer one is skipped with a warning naming
    both (an older good one still resumes exactly). Only when none loads is the newest one's error raised."""
    dirs = checkpoint_dirs(out_dir)
    first_error = None
    for path in reversed(dirs):
        try:
            state = load_checkpoint(path, model)
        except SmalltalkError as exc:
            first_error = first_error or exc
            continue
        if first_error is not None and verbose:
            print(f"warning: {first_error.where} is damaged ({first_error.what.split(':')[0]}); resuming from the "
                  f"older {path}", file=sys.stderr, flush=True)
        return path, state
    if first_error is not None:
        raise first_error
    return None, None


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 2) -> Path:
    quiet_transformers()
    final = TrainFiles(Path(out_dir)).checkpoint(step)
    if final.parent.is_dir():
        remove_stale_temps(final.parent)  # saves of killed trainers; a live writer's (any host) is kept
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        torch.save(_canonical(state), tmp / TRAINER_STATE)
    prune_checkpoints(out_dir, keep)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int, resumed_from: Path | None = None) -> None:
    """All but the newest `keep` checkpoints removed (keep 0: none), never the one a trainer resumed from (newer
    ones may be damaged). After each save, and again on resume: a trainer killed between a save and its pruning
    leaves one too many, which a finished resume never saves over."""
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        if old != resumed_from:
            remove_tree(old)


def _canonical(obj: Any) -> Any:
    """`obj` rebuilt with fresh containers and interned strings. Pickle writes a string or container seen
    before as a back-reference, so bytes depend on object identity: the optimizer's state keys are the
    code's interned literals in a fresh job but fresh strings in one resumed from a checkpoint. Rebuilt,
    a resumed job's checkpoint is byte-identical to an uninterrupted one's (tests/test_faults.py)."""
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_canonical(v) for v in obj)
    return sys.intern(obj) if type(obj) is str else obj


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` and return the trainer state; SmalltalkError on damaged files."""
    from safetensors.torch import load_file

    fix = f"delete {path} to resume from the previous checkpoint, or start without --resume"
    weights = path / WEIGHTS
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SmalltalkError(f"checkpoint weights are unreadable (truncated or corrupt): {exc}",
                             where=str(weights), fix=fix) from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SmalltalkError(f"checkpoint does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})", where=str(weights),
                             fix="resume with the same model config that wrote it")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    try:
        return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)  # no code runs on load
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on damaged pickles
        raise SmalltalkError(f"trainer state is unreadable (truncated or corrupt): {exc}",
                             where=str(path / TRAINER_STATE), fix=fix) from None
