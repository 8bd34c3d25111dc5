"""`smalltalk export`: a self-contained mixture directory (no reference back to the run).

DIR/ mixture.json  tokenizer/  routers/ (manifest + NN/model or tf-idf state)  experts/NN/model/  README.md
Every expert loads with AutoModelForCausalLM and the tokenizer with AutoTokenizer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import RunLayout
from smalltalk.mixture import MIXTURE_FILE


def export_mixture(run: RunLayout, out: Path) -> Path:
    manifest_path = run.root / MIXTURE_FILE
    if not manifest_path.is_file():
        raise SmalltalkError(f"no {MIXTURE_FILE} in {run.root}", fix="train the experts first (`smalltalk run`)")
    manifest = read_json(manifest_path)
    routers = read_json(run.routers / "manifest.json")
    with atomic_dir(out) as tmp:
        shutil.copytree(run.tokenizer, tmp / "tokenizer")
        (tmp / "routers").mkdir()
        for name in routers.get("routers", []):
            shutil.copytree(run.routers / name / "model", tmp / "routers" / name / "model")
        for extra in ("tfidf.pkl", "tokenizer.json", "em_history.json"):
            if (run.routers / extra).is_file():
                shutil.copy(run.routers / extra, tmp / "routers" / extra)
        write_json(tmp / "routers" / "manifest.json", routers)
        for rel in manifest["expert_dirs"] + manifest.get("router_dirs", []):  # router_dirs: elastic pairs
            if not (tmp / rel).exists():
                shutil.copytree(run.root / rel, tmp / rel)
        write_json(tmp / MIXTURE_FILE, manifest)
        (tmp / "README.md").write_text(model_card(run, manifest))
    return out


def model_card(run: RunLayout, manifest: dict) -> str:
    lines = [f"# SmallTalk LM mixture: {run.root.name}", "",
             f"{manifest['experts']} experts routed by {manifest['method']} routers on the first "
             f"{manifest['prefix']} tokens (argmax of router log-likelihoods).", "",
             "```python", "from smalltalk.mixture import SmallTalkMixture",
             "mixture = SmallTalkMixture.from_pretrained('.')", "```", "",
             "Each `experts/NN/model` is a plain Hugging Face `LlamaForCausalLM`; `tokenizer/` loads with "
             "`AutoTokenizer`.", ""]
    results = run.eval / "results.json"
    if results.is_file():
        from smalltalk.mixture_eval import format_results

        lines += ["## Evaluation (test split of the training run)", "", format_results(read_json(results)), ""]
    return "\n".join(lines) + "\n"
