"""Fit a byte-level BPE tokenizer on the train split, or adopt a local Hugging Face tokenizer.

Either way RUN/tokenizer/ holds a `tokenizer.json` that `transformers.AutoTokenizer` loads, plus a
manifest with the vocabulary size and the end-of-text id the packer joins documents with.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smalltalk.config import Config
from smalltalk.data.ingest import iter_documents, split_of
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, sha256_file, write_json
from smalltalk.layout import TokenizerFiles, manifest_of
from smalltalk.llama import pretrained_spec


def encode_text(tokenizer, text: str) -> list[int]:
    """The one way text becomes token ids outside `data prepare`: without special tokens, as the corpus was
    encoded. A pretrained tokenizer whose post-processor adds BOS would otherwise put BOS on every routing
    prefix and in the middle of every SFT example, where training never saw one."""
    return tokenizer(text, add_special_tokens=False).input_ids


def train_texts(cfg: Config, stats: dict) -> Iterator[str]:
    """The train-split documents, capped at tokenizer.max_train_chars (split first, then fit)."""
    budget = cfg.tokenizer.max_train_chars
    used = 0
    for doc in iter_documents(cfg.data, stats):
        if split_of(doc.text, cfg.data) != "train":
            continue
        if budget is not None and used >= budget:
            break
        used += len(doc.text)
        stats["chars"] = used
        yield doc.text


def train_tokenizer(cfg: Config, out_dir: str | Path) -> dict:
    """Fit byte-level BPE with HF `tokenizers`; write RUN/tokenizer atomically; return the manifest."""
    tok_cfg = cfg.tokenizer
    if tok_cfg.vocab_size < 258:
        raise SmalltalkError(f"tokenizer.vocab_size={tok_cfg.vocab_size} is below the 256 byte symbols + 1",
                             fix="use a vocab_size of at least 258")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tok_cfg.vocab_size, min_frequency=tok_cfg.min_frequency, show_progress=False,
        special_tokens=[tok_cfg.eot_token], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stats: dict = {}
    start = time.perf_counter()
    tokenizer.train_from_iterator(_batched(train_texts(cfg, stats)), trainer=trainer)
    seconds = time.perf_counter() - start
    if stats.get("chars", 0) == 0:
        raise SmalltalkError("no training documents to fit the tokenizer on", fix="check data.inputs and splits")
    with atomic_dir(out_dir) as tmp:
        _save_hf(tokenizer, tok_cfg.eot_token, tmp)
        manifest = _manifest(tmp, tokenizer, tok_cfg.eot_token, source="trained")
        manifest.update(train_chars=stats["chars"], train_seconds=round(seconds, 3),
                        train_mb_per_s=round(stats["chars"] / 1e6 / max(seconds, 1e-9), 3))
        write_json(manifest_of(tmp), manifest)
    return manifest


def make_tokenizer(cfg: Config, out_dir: str | Path, pretrained: str | Path | None = None) -> dict:
    """The tokenizer stage: adopt `pretrained` (or tokenizer.pretrained, or the checkpoint the experts start
    from with experts.init=pretrained: its embeddings fit its own tokenizer only) when given, else fit BPE."""
    if cfg.experts.init == "pretrained" and not (pretrained or cfg.tokenizer.pretrained):
        pretrained_spec(Path(cfg.experts.pretrained))  # a checkpoint at all? (fails before any work)
        pretrained = cfg.experts.pretrained
    pretrained = pretrained or cfg.tokenizer.pretrained
    return adopt_pretrained(cfg, pretrained, out_dir) if pretrained else train_tokenizer(cfg, out_dir)


def adopt_pretrained(cfg: Config, source: str | Path, out_dir: str | Path) -> dict:
    """Copy a local HF tokenizer (it must have a fast `tokenizer.json`) into the run."""
    from transformers import AutoTokenizer

    source = Path(source)
    source_json = TokenizerFiles(source).tokenizer_json
    if not source_json.is_file():
        raise SmalltalkError(f"no {source_json.name} in {source}",
                             fix="point --pretrained at a directory saved by a fast HF tokenizer")
    hf = AutoTokenizer.from_pretrained(str(source))
    eot = hf.eos_token or cfg.tokenizer.eot_token
    tokenizer = Tokenizer.from_file(str(source_json))
    if tokenizer.token_to_id(eot) is None:
        raise SmalltalkError(f"tokenizer in {source} has no end-of-text token {eot!r}",
                             fix="set tokenizer.eot_token to a special token it has")
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
        manifest = _manifest(tmp, tokenizer, eot, source=str(source))
        write_json(manifest_of(tmp), manifest)
    return manifest


def _batched(texts: Iterator[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_hf(tokenizer: Tokenizer, eot: str, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eot, bos_token=eot, unk_token=None)
    hf.save_pretrained(str(out))


def _manifest(directory: Path, tokenizer: Tokenizer, eot: str, source: str) -> dict:
    return {
        "kind": "tokenizer",
        "source": source,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eot_token": eot,
        "eot_id": tokenizer.token_to_id(eot),
        "sha256": sha256_file(TokenizerFiles(directory).tokenizer_json),
    }


def load_tokenizer(tokenizer_dir: str | Path) -> tuple[Tokenizer, dict]:
    """The fast tokenizer plus its manifest; a clear error if the stage has not run."""
    tokenizer_dir = Path(tokenizer_dir)
    manifest_path = manifest_of(tokenizer_dir)
    if not manifest_path.is_file():
        raise SmalltalkError(f"no tokenizer at {tokenizer_dir}",
                             fix="run `smalltalk tokenizer train` (or `--pretrained DIR`) first")
    return Tokenizer.from_file(str(TokenizerFiles(tokenizer_dir).tokenizer_json)), read_json(manifest_path)
