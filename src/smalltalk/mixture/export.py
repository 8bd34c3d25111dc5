"""`smalltalk export`: a self-contained mixture directory (no reference back to the run).

DIR/ mixture.json  tokenizer/  routers/ (manifest + NN/model or tf-idf state)  experts/NN/model/  README.md
Every expert loads with AutoModelForCausalLM and the tokenizer with AutoTokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import MODEL_CARD, RouterFiles, RunLayout, manifest_of
from smalltalk.mixture.model_card import model_card

FORMATS = ("hf", "smalltalk")


def export_mixture(run: RunLayout, out: Path, force: bool = False, format: str = "hf", top_k: int = 1,
                   temperature: float = 1.0) -> Path:
    """Write the mixture of `run` to `out` (replaced atomically): the Hugging Face layout (`hf`,
    mixture/export_hf.py) or ours (`smalltalk`: what `smalltalk serve/eval/generate --run` read). An existing
    non-empty `out` is refused unless `force`; a run directory, or a directory holding the run, never."""
    if format not in FORMATS:
        raise SmalltalkError(f"--format {format!r}", fix=f"use one of {', '.join(FORMATS)}")
    _check_target(run, Path(out), force)
    manifest = run.mixture()
    _refuse_links_out(run, [run.tokenizer, run.mixture_routers(), *(run.root / rel for rel in
                                                           manifest["expert_dirs"] + manifest.get("router_dirs", []))])
    if format == "hf":
        from smalltalk.mixture.export_hf import export_hf

        return export_hf(run, Path(out), top_k, temperature)
    with atomic_dir(out) as tmp:
        staged = RunLayout(tmp)  # written under the temp name, renamed to `out` when complete
        shutil.copytree(run.tokenizer, staged.tokenizer)
        copy_routers(run, staged.routers)
        for rel in manifest["expert_dirs"] + manifest.get("router_dirs", []):  # router_dirs: elastic pairs
            if not (tmp / rel).exists():
                shutil.copytree(run.root / rel, tmp / rel)
        write_json(staged.mixture_file, {**manifest, "routers": str(staged.routers.relative_to(tmp))})
        (tmp / MODEL_CARD).write_text(model_card(run, manifest))
    return out


def copy_routers(run: RunLayout, target_dir: Path, copy=shutil.copy2) -> None:
    """The routers a mixture needs (models, extras, manifest) into `target_dir`, not their training
    checkpoints; `copy`: os.link to share the files on one file system."""
    source_dir = run.mixture_routers()  # RUN/routers, or RUN/routers-refined
    routers = read_json(manifest_of(source_dir))
    target_dir.mkdir(exist_ok=True)
    source, target = RouterFiles(source_dir), RouterFiles(target_dir)
    for name in routers.get("routers", []):
        shutil.copytree(source.router(name).model, target.router(name).model, copy_function=copy)
    for extra in source.extras():
        if (source_dir / extra).is_file():
            copy(source_dir / extra, target_dir / extra)
    write_json(manifest_of(target_dir), routers)


def _refuse_links_out(run: RunLayout, directories: list[Path]) -> None:
    """An export copies what links point to: a link out of the run would copy files the run does not own
    (someone else's weights, or any file the user can read) into a directory meant to be shared."""
    root = run.root.resolve()
    for directory in directories:
        for path in [directory, *directory.rglob("*")]:
            if path.is_symlink() and root not in path.resolve().parents:
                raise SmalltalkError(f"{path} is a link to {path.resolve()}, outside the run", where=str(path),
                                     fix="replace the link by the file itself, or remove it")


def _check_target(run: RunLayout, out: Path, force: bool) -> None:
    run.check_output(out, "--out")
    if RunLayout(out).has_mixture() and not (out / MODEL_CARD).is_file():
        raise SmalltalkError(f"--out {out} holds a mixture that is not an export (an SFT output?)",
                             fix="choose a new directory for the export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SmalltalkError(f"--out {out} exists and is not empty", fix="choose a new directory, or pass --force "
                             "to replace it")
