"""`smalltalk export --format smalltalk` (mixture/export.py): our layout, which loads elsewhere with the same
outputs (the Hugging Face layout, the default: tests/test_export_hf.py)."""

from __future__ import annotations

import numpy as np
import pytest

from smalltalk.data.shards import SplitData
from smalltalk.mixture.model import SmallTalkMixture

from .conftest import cli

pytestmark = pytest.mark.slow


def test_export_loads_in_a_fresh_process_with_the_same_logits(pipeline_run, tmp_path):
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = pipeline_run[0]
    out = tmp_path / "export"
    assert cli("export", "--run", run, "--out", out, "--format", "smalltalk") == 0
    assert "Evaluation" in (out / "README.md").read_text()
    AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    tokens = SplitData(run / "data", "test").batch(np.arange(4))
    np.save(tmp_path / "tokens.npy", tokens)
    script = (
        "import sys, numpy as np, torch\n"
        "from smalltalk.mixture.model import SmallTalkMixture\n"
        f"m = SmallTalkMixture.from_pretrained({str(out)!r})\n"
        f"x = np.load({str(tmp_path / 'tokens.npy')!r})\n"
        "nll, chosen = m.score(x, 16)\n"
        f"torch.save({{'nll': nll, 'chosen': chosen}}, {str(tmp_path / 'fresh.pt')!r})\n")
    shutil_run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert shutil_run.returncode == 0, shutil_run.stderr
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)
    nll, chosen = SmallTalkMixture.from_pretrained(run).score(tokens, 16)
    assert np.array_equal(fresh["chosen"], chosen) and torch.equal(fresh["nll"], nll)
    for k in range(3):
        a = AutoModelForCausalLM.from_pretrained(str(out / "experts" / f"{k:02d}" / "model"))
        b = AutoModelForCausalLM.from_pretrained(str(run / "experts" / f"{k:02d}" / "model"))
        x = torch.from_numpy(tokens)
        with torch.no_grad():
            assert torch.equal(a(x).logits, b(x).logits)


def test_export_never_overwrites_a_run_and_asks_before_replacing(pipeline_run, tmp_path, capsys):
    run = pipeline_run[0]
    before = sorted(p.name for p in run.iterdir())
    assert cli("export", "--run", run, "--out", run) == 2
    assert cli("export", "--run", run, "--out", run.parent) == 2  # a directory holding the run
    other = tmp_path / "other-run"
    (other / "data").mkdir(parents=True)
    (other / "data" / "manifest.json").write_text("{}")
    assert cli("export", "--run", run, "--out", other, "--force") == 2
    assert "run directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (other / "data" / "manifest.json").is_file()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli("export", "--run", run, "--out", taken) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "notes.txt").read_text() == "mine"
    assert cli("export", "--run", run, "--out", taken, "--force", "--format", "smalltalk") == 0
    assert (taken / "mixture.json").is_file() and not (taken / "notes.txt").exists()
    # --force replaces an export of either layout; a Hugging Face export's config.json is not a run's (it was
    # refused as "a run directory" before)
    for _ in range(2):
        assert cli("export", "--run", run, "--out", taken, "--force") == 0
        assert (taken / "model.safetensors").is_file() and not (taken / "mixture.json").exists()
