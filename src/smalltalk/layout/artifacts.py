"""The files of one artifact directory (a training output, prepared data, routers, a partition, SFT) and
its manifest: what a stage writes wherever it runs, named here so that no other module spells them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"  # inside an HF model directory
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensors to files
TRAINER_STATE = "trainer_state.pt"  # optimizer, scheduler, RNG and data cursor of a checkpoint
STEP_DIR = re.compile(r"^step_(\d{8})$")
HF_CONFIG = "config.json"  # what marks a directory as an HF model
CORPUS_STATS = "stats.json"  # `corpus demo` output
MODEL_CARD = "README.md"  # of an exported mixture
# RUN/dense/KIND (experts/dense.py: what each is matched to); `matched` is the headline baseline
DENSE_KINDS = ("matched", "matched-trunk", "matched-experts", "inference", "bigger")
REPORT_PLOTS = {"loss": "loss_curves.png", "prefix": "ppl_vs_prefix.png", "loads": "expert_loads.png",
                "domains_x_experts": "domain_expert_heatmap.png", "em": "em_curve.png",
                "per_domain": "per_domain_ppl.png"}


def manifest_of(directory: Path) -> Path:
    return Path(directory) / MANIFEST


def read_manifest(directory: Path, fix: str) -> dict:
    """The manifest of an artifact directory, or a SmalltalkError saying which stage makes it."""
    path = manifest_of(directory)
    if not path.is_file():
        raise SmalltalkError(f"no {Path(directory).name} at {directory} (no {MANIFEST})", fix=fix)
    return read_json(path)


@dataclass(frozen=True)
class TrainFiles:
    """What `train()` writes into its output directory."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "train_manifest.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def consumed_ids(self) -> Path:
        return self.root / "consumed_ids.npy"

    def summary(self) -> dict | None:
        return read_json(self.manifest) if self.manifest.is_file() else None

    def done(self, steps: int | None = None) -> bool:
        """Finished (and, if `steps` is given, trained for at least that many steps)."""
        summary = self.summary()
        return summary is not None and (steps is None or summary["steps"] >= steps)


@dataclass(frozen=True)
class DataFiles:
    """Packed token shards of one prepared dataset (data/shards.py)."""

    root: Path

    def tokens(self, split: str) -> Path:
        return self.root / f"{split}.bin"

    def index(self, split: str, name: str) -> Path:
        """Per-split arrays: doc_starts, doc_domains, seq_domains."""
        return self.root / f"{split}.{name}.npy"

    def raw_index(self, split: str, name: str) -> Path:
        """An index being appended to while a part is encoded (converted to .npy when the part closes)."""
        return self.root / f"{split}.{name}.raw"


@dataclass(frozen=True)
class TokenizerFiles:
    root: Path

    @property
    def tokenizer_json(self) -> Path:
        return self.root / "tokenizer.json"


@dataclass(frozen=True)
class RouterFiles:
    """A routers directory: one training output per router LM, or a tf-idf state, plus EM's resume state."""

    root: Path

    def router(self, name: str) -> TrainFiles:
        return TrainFiles(self.root / name)

    @property
    def tfidf(self) -> Path:
        """idf, SVD components and centroids (npz: arrays only, nothing that runs code when loaded)."""
        return self.root / "tfidf.npz"

    @property
    def ngram(self) -> Path:
        """The n-gram routers' count tables (routing/ngram.py; npz: arrays only)."""
        return self.root / "ngram.npz"

    @property
    def tfidf_vocab(self) -> Path:
        return self.root / "tfidf_vocab.json"

    @property
    def legacy_pickle(self) -> Path:
        """What older versions wrote; refused on load (unpickling can run arbitrary code)."""
        return self.root / "tfidf.pkl"

    @property
    def tokenizer_json(self) -> Path:  # the tf-idf router decodes ids back to text with it
        return self.root / "tokenizer.json"

    @property
    def warm_start(self) -> Path:
        """The tf-idf clustering EM's round 0 starts from (routing.init_split: tfidf)."""
        return self.root / "warm-start"

    @property
    def em_state(self) -> Path:
        return self.root / "em_state.json"

    @property
    def em_history(self) -> Path:
        return self.root / "em_history.json"

    @property
    def refine_labels(self) -> Path:
        """Refinement's sample (experts/refine.py): the sequence ids and each one's lowest-loss expert."""
        return self.root / "labels.npz"

    def round_share(self, r: int) -> Path:
        return self.root / "shares" / f"round_{r:03d}.npz"

    def heldout_best(self, r: int) -> Path:
        return self.root / "shares" / f"heldout_best_{r:03d}.npy"

    def extras(self) -> list[str]:
        """Files besides the router models that an export copies."""
        return [p.name for p in (self.tfidf, self.tfidf_vocab, self.ngram, self.tokenizer_json, self.em_history)]


@dataclass(frozen=True)
class Parts:
    """The parts of an artifact made by independent jobs: OUT.parts/IIIIIIII-JJJJJJJJ/ holds items [I, J)
    (chunks of a partition, input files of a dataset) with its own manifest; a merge writes OUT from them."""

    root: Path

    @property
    def parts(self) -> Path:
        return self.root.with_name(self.root.name + ".parts")

    def part(self, start: int, stop: int) -> Path:
        return self.parts / f"{start:08d}-{stop:08d}"

    def part_ranges(self) -> list[tuple[int, int]]:
        """(first chunk, end chunk) of every finished part, sorted."""
        if not self.parts.is_dir():
            return []
        found = [p.name.split("-") for p in self.parts.iterdir()
                 if not p.name.startswith(".") and manifest_of(p).is_file()]  # not a temp dir
        return sorted((int(a), int(b)) for a, b in found)

    def covered(self, total: int) -> bool:
        """The finished parts tile [0, total) exactly."""
        pos = 0
        for start, stop in self.part_ranges():
            if start != pos:
                return False
            pos = stop
        return pos == total


@dataclass(frozen=True)
class PartitionFiles(Parts):
    """A partition: OUT/expert_NN.npy (train-sequence ids of expert NN, in chunk order) + manifest; its
    parts hold expert_NN.int64 raw ids per chunk range."""

    @staticmethod
    def share_name(expert: int) -> str:
        return f"expert_{expert:02d}.npy"

    def share(self, expert: int) -> Path:
        return self.root / self.share_name(expert)

    @staticmethod
    def part_ids(part_dir: Path, expert: int) -> Path:
        return Path(part_dir) / f"expert_{expert:02d}.int64"


@dataclass(frozen=True)
class SFTFiles:
    """RUN/sft: routed post-training. A mixture directory of its own (mixture.json, tokenizer/ with the chat
    template, routers/ linked from the run's, experts/KK/model), so generate / serve / export take it."""

    root: Path

    def job(self, name: str) -> Path:  # a fine-tuning job's directory (TrainFiles): experts/KK or dense
        return self.root / name

    def job_data(self, name: str) -> Path:  # its rows: tokens.npy [N, L], labels.npy (-100: no loss), manifest
        return self.root / "data" / name

    @staticmethod
    def rows(data_dir: Path, kind: str) -> Path:
        return Path(data_dir) / {"tokens": "tokens.npy", "labels": "labels.npy"}[kind]

    @property
    def examples(self) -> Path:
        return self.root / "examples.json"  # the routed examples: expert, domain, split, routing scores

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_final(self) -> Path:
        """The test instructions' measurement (`smalltalk sft --final`), made once for the final table."""
        return self.root / "results-final.json"
