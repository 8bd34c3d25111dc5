"""Shared fixtures: a small synthetic multi-domain corpus and a prepared run built from it once."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from smalltalk.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
ROUTING = ["--config", str(TINY_CONFIG), "--set", "routing.experts=3", "--set", "routing.chunk=240",
           "--set", "routing.rounds=3", "--set", "routing.train.steps=30", "--set", "routing.heldout_sequences=60"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

_ALPHABETS = {
    "code": "xyz_(){}=;+0123456789",
    "prose": "etaoinshrdlu",
    "german": "äöüßkwjvbpfgmc",
}


def make_documents(n_docs: int = 120, seed: int = 0) -> list[dict]:
    """Documents from three synthetic 'domains' with distinct vocabularies and word statistics."""
    rng = random.Random(seed)
    vocabularies = {domain: ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(150)]
                    for domain, letters in _ALPHABETS.items()}
    docs = []
    for i in range(n_docs):
        domain = list(_ALPHABETS)[i % len(_ALPHABETS)]
        start = rng.randrange(100)
        words = [rng.choice(vocabularies[domain][start:start + 50]) for _ in range(rng.randint(80, 200))]
        docs.append({"text": " ".join(words), "domain": domain, "source": f"synthetic-{i}"})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def hf_prefix_loglik(model_dirs: list[Path], tokens):
    """Reference router scores built without our scoring code: each router loaded by HF alone, the sum of
    log_softmax(logits)[t, x_{t+1}] over the prefix, one row per sequence, one column per router."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    x = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    columns = []
    for directory in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.double(), dim=-1)
        columns.append(logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1).sum(-1))
    return torch.stack(columns, dim=1).numpy()


def router_model_dirs(routers: Path) -> list[Path]:
    names = json.loads((routers / "manifest.json").read_text())["routers"]
    return [routers / name / "model" for name in names]


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def partition_with(run: Path, routers: Path, out: Path, *extra: str) -> dict:
    """`smalltalk partition` of RUN's data by `routers` into `out`; its manifest."""
    assert cli("partition", "--config", TINY_CONFIG, "--run", run, "--routers", routers, "--out", out, *extra) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_documents())


@pytest.fixture(scope="session")
def instructions(tmp_path_factory) -> Path:
    """A labelled instruction set from the synthetic domains: 3 words of a document -> the next 3."""
    out = tmp_path_factory.mktemp("instructions")
    docs = make_documents(150, seed=7)
    rows = [{"prompt": " ".join(d["text"].split()[:3]), "completion": " ".join(d["text"].split()[3:6]),
             "domain": d["domain"]} for d in docs]
    for split, part in (("train", rows[:120]), ("validation", rows[120:135]), ("test", rows[135:])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return out


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory, corpus_file) -> Path:
    """RUN with tokenizer/ and data/ built by the real CLI from the synthetic corpus."""
    run = tmp_path_factory.mktemp("run")
    common = ["--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]",
              "--set", "data.max_docs=null", "--set", "data.test_fraction=0.1",
              "--set", "data.validation_fraction=0.1"]
    assert cli("tokenizer", "train", *common) == 0
    assert cli("data", "prepare", *common) == 0
    return run


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, corpus_file):
    """A whole tiny run (3 experts, dense baselines, eval, report) made by `smalltalk run`."""
    run = tmp_path_factory.mktemp("pipeline") / "run"
    args = ["run", "--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]",
            "--set", "data.max_docs=null", "--set", "routing.chunk=240", "--set", "routing.experts=3"]
    assert cli(*args) == 0
    return run, args


@pytest.fixture(scope="session")
def ngram_run(corpus_file, tmp_path_factory) -> Path:
    """A whole tiny run routed by count-based bigram routers (routing.method=ngram), made by `smalltalk run`."""
    run = tmp_path_factory.mktemp("ngram") / "run"
    assert cli("run", "--config", TINY_CONFIG, "--run", run, "--set", f"data.inputs=[{corpus_file}]", "--set",
               "data.max_docs=null", "--set", "routing.method=ngram", "--set", "routing.chunk=240", "--set",
               "routing.experts=3", "--set", "dense.bigger=false", "--set", "sft.enabled=false") == 0
    return run


@pytest.fixture(scope="session")
def em_run(prepared_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("em") / "routers"
    assert cli("routers", "train", *ROUTING, "--run", prepared_run, "--out", out) == 0
    return out
