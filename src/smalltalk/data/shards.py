"""Packed token shards: documents joined with end-of-text, cut into fixed-length sequences on disk.

Layout of RUN/data/ (one set of files per split):
  {split}.bin              uint16/uint32 tokens; sequence i is tokens[i*S:(i+1)*S] (O(1) random access)
  {split}.doc_starts.npy   int64 token offset of every document start
  {split}.doc_domains.npy  int16 domain id per document (-1: unlabelled)
  {split}.seq_domains.npy  int16 domain id of each sequence (the domain of its first token)
  manifest.json            counts, vocab, seq_len, dtype, sha256 of every .bin, domain names
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from smalltalk.config import Config
from smalltalk.data.ingest import SPLITS, iter_documents, split_of
from smalltalk.data.order import SequenceOrder
from smalltalk.data.tokenizer import load_tokenizer
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, sha256_file, write_json
from smalltalk.layout import DataFiles, manifest_of

FORMAT_VERSION = 1


class _SplitWriter:
    """Appends encoded documents of one split to its token file and tracks document offsets."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, eot_id: int) -> None:
        self.split, self.dtype = split, dtype
        self.handle = open(DataFiles(directory).tokens(split), "wb")  # noqa: SIM115 - closed in finish()
        self.hasher = hashlib.sha256()
        self.eot = np.array([eot_id], dtype=dtype)
        self.n_tokens = 0
        self.doc_lengths: list[np.ndarray] = []
        self.doc_domains: list[int] = []

    def add(self, encodings: list, domains: list[int]) -> None:
        pieces = []
        for enc in encodings:
            pieces.append(np.asarray(enc.ids, dtype=self.dtype))
            pieces.append(self.eot)
        block = np.concatenate(pieces)
        data = block.tobytes()
        self.handle.write(data)
        self.hasher.update(data)
        self.n_tokens += block.size
        self.doc_lengths.append(np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings)))
        self.doc_domains.extend(domains)

    def finish(self, directory: Path, seq_len: int) -> dict:
        """Truncate to whole sequences (the dropped tail is recorded) and write the index arrays."""
        self.handle.close()
        n_seq = self.n_tokens // seq_len
        kept = n_seq * seq_len
        path = DataFiles(directory).tokens(self.split)
        if kept != self.n_tokens:
            with open(path, "r+b") as handle:
                handle.truncate(kept * self.dtype.itemsize)
            digest = sha256_file(path)
        else:
            digest = self.hasher.hexdigest()
        lengths = np.concatenate(self.doc_lengths) if self.doc_lengths else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths.size else lengths
        doc_domains = np.asarray(self.doc_domains, dtype=np.int16)
        seq_first = np.arange(n_seq, dtype=np.int64) * seq_len
        seq_domains = doc_domains[np.searchsorted(starts, seq_first, side="right") - 1] if n_seq else \
            np.zeros(0, np.int16)
        np.save(DataFiles(directory).index(self.split, "doc_starts"), starts)
        np.save(DataFiles(directory).index(self.split, "doc_domains"), doc_domains)
        np.save(DataFiles(directory).index(self.split, "seq_domains"), seq_domains.astype(np.int16))
        return {"documents": int(lengths.size), "tokens": int(kept), "sequences": int(n_seq),
                "tail_tokens_dropped": int(self.n_tokens - kept), "sha256": digest}


def prepare_data(cfg: Config, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Read, split by document, encode in parallel batches, pack and write RUN/data atomically."""
    tokenizer, tok_manifest = load_tokenizer(tokenizer_dir)
    vocab, eot_id = tok_manifest["vocab_size"], tok_manifest["eot_id"]
    dtype = np.dtype(np.uint16 if vocab < 65536 else np.uint32)
    seq_len, batch_docs = cfg.data.seq_len, cfg.data.encode_batch_docs
    if seq_len < 2:
        raise SmalltalkError(f"data.seq_len must be at least 2, got {seq_len}")
    stats: dict = {}
    domains: dict[str, int] = {}
    start = time.perf_counter()
    chars = 0
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        writers = {s: _SplitWriter(tmp, s, dtype, eot_id) for s in SPLITS}
        buffers: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
        pending = None  # encoding runs in a thread (Rust releases the GIL) while we read the next batch
        bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=None, mininterval=1.0)

        def flush(split: str) -> None:
            nonlocal pending
            texts, doms = buffers[split]
            buffers[split] = ([], [])
            if pending is not None:
                pending.result()
            future = pool.submit(tokenizer.encode_batch, texts, add_special_tokens=False)
            pending = pool.submit(lambda f=future, s=split, d=doms: writers[s].add(f.result(), d))

        for doc in iter_documents(cfg.data, stats):
            split = split_of(doc.text, cfg.data)
            domain_id = -1 if doc.domain is None else domains.setdefault(doc.domain, len(domains))
            buffers[split][0].append(doc.text)
            buffers[split][1].append(domain_id)
            chars += len(doc.text)
            bar.update(len(doc.text))
            if len(buffers[split][0]) >= batch_docs:
                flush(split)
        for split in SPLITS:
            if buffers[split][0]:
                flush(split)
        if pending is not None:
            pending.result()
        bar.close()
        split_info = {s: w.finish(tmp, seq_len) for s, w in writers.items()}
        if split_info["train"]["sequences"] == 0:
            raise SmalltalkError(
                f"the train split holds fewer than seq_len={seq_len} tokens",
                fix="add documents or lower data.seq_len")
        seconds = time.perf_counter() - start
        manifest = {
            "kind": "data", "format_version": FORMAT_VERSION, "seq_len": seq_len, "dtype": dtype.name,
            "vocab_size": vocab, "eot_id": eot_id, "tokenizer_sha256": tok_manifest["sha256"],
            "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "domains": sorted(domains, key=domains.get), "splits": split_info,
            "order": {"kind": "feistel", "seed": cfg.data.order_seed},
            "documents": stats["documents"], "empty_documents_skipped": stats["empty_documents_skipped"],
            "chars": chars, "seconds": round(seconds, 3), "mb_per_s": round(chars / 1e6 / seconds, 3),
            "data_config": dataclasses.asdict(cfg.data),
        }
        write_json(manifest_of(tmp), manifest)
    return manifest


def write_pretokenized(out_dir: str | Path, splits: dict[str, np.ndarray], vocab_size: int, eot_id: int,
                       tokenizer_sha256: str, seq_domains: dict[str, np.ndarray] | None = None,
                       domain_names: list[str] | None = None, block: int = 1 << 16) -> dict:
    """Prepared data from token sequences made elsewhere: `splits[name]` is an [n, seq_len] integer array
    (a np.memmap is read block by block), `seq_domains[name]` optional int16 labels (-1: none). For corpora
    tokenised by another pipeline, and for synthetic benchmarks; the result reads like `prepare_data`'s."""
    seq_len = next(iter(splits.values())).shape[1]
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise SmalltalkError(f"vocab_size={vocab_size!r} must be an integer >= 2")
    dtype = np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)
    with atomic_dir(out_dir) as tmp:
        info = {}
        for split in SPLITS:
            rows = splits.get(split, np.zeros((0, seq_len), dtype))
            if len(rows) and rows.shape[1] != seq_len:
                raise SmalltalkError(f"split {split!r} has sequences of {rows.shape[1]} tokens, not {seq_len}")
            digest = hashlib.sha256()
            with open(DataFiles(tmp).tokens(split), "wb") as handle:
                for start in range(0, len(rows), block):
                    data = np.ascontiguousarray(rows[start:start + block], dtype=dtype).tobytes()
                    handle.write(data)
                    digest.update(data)
            labels = (seq_domains or {}).get(split)
            labels = np.full(len(rows), -1, np.int16) if labels is None else np.asarray(labels, np.int16)
            np.save(DataFiles(tmp).index(split, "seq_domains"), labels)
            np.save(DataFiles(tmp).index(split, "doc_starts"), np.zeros(0, np.int64))
            np.save(DataFiles(tmp).index(split, "doc_domains"), np.zeros(0, np.int16))
            info[split] = {"documents": 0, "tokens": int(rows.size), "sequences": len(rows), "tail_tokens_dropped": 0,
                           "sha256": digest.hexdigest()}
        manifest = {"kind": "data", "format_version": FORMAT_VERSION, "seq_len": int(seq_len), "dtype": dtype.name,
                    "vocab_size": vocab_size, "eot_id": eot_id, "tokenizer_sha256": tokenizer_sha256,
                    "tokenizer_dir": None, "domains": list(domain_names or []), "splits": info,
                    "order": {"kind": "feistel", "seed": 0}, "source": "pretokenized"}
        write_json(manifest_of(tmp), manifest)
    return manifest


class _Rows:
    """Rows `ids` of a token matrix, read block by block (for write_pretokenized)."""

    def __init__(self, tokens: np.ndarray, ids: np.ndarray) -> None:
        self.tokens, self.ids = tokens, ids
        self.shape = (len(ids), tokens.shape[1])
        self.size = self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.tokens[np.asarray(self.ids[rows])]


def write_subset(data: SplitData, ids: np.ndarray, out_dir: str | Path, validation: SplitData | None = None,
                 validation_ids: np.ndarray | None = None) -> dict:
    """Sequences `ids` of `data` (in that order) as a prepared dataset of their own: what one expert job
    needs on a machine without the corpus. Row p is sequence ids[p], so training over range(len(ids)) here
    draws exactly the tokens that training over `ids` of the full data draws."""
    splits, labels = {"train": _Rows(data.tokens, ids)}, {"train": data.seq_domains[np.asarray(ids)]}
    if validation is not None and validation_ids is not None and len(validation_ids):
        splits["validation"] = _Rows(validation.tokens, validation_ids)
        labels["validation"] = validation.seq_domains[validation_ids]
    manifest = write_pretokenized(out_dir, splits, data.vocab_size, data.manifest["eot_id"],
                                  data.manifest["tokenizer_sha256"], labels, data.domain_names)
    return manifest


class SplitData:
    """Read-only view of one split: O(1) access to sequence i via np.memmap."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.dir = Path(data_dir)
        manifest_path = manifest_of(self.dir)
        if not manifest_path.is_file():
            raise SmalltalkError(f"no prepared data at {self.dir}", fix="run `smalltalk data prepare` first")
        self.manifest = read_json(manifest_path)
        if split not in self.manifest["splits"]:
            raise SmalltalkError(f"unknown split {split!r}", fix=f"use one of {', '.join(SPLITS)}")
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        info = self.manifest["splits"][split]
        self.num_sequences: int = info["sequences"]
        dtype = np.dtype(self.manifest["dtype"])
        path = DataFiles(self.dir).tokens(split)
        expected = info["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise SmalltalkError(f"token file is missing or has the wrong size (expected {expected} bytes)",
                                 where=str(path), fix="re-run `smalltalk data prepare`")
        self._dtype = dtype
        self._map()
        self.domain_names: list[str] = self.manifest["domains"]

    def _map(self) -> None:
        path = DataFiles(self.dir).tokens(self.split)
        self.tokens = (np.memmap(path, dtype=self._dtype, mode="r", shape=(self.num_sequences, self.seq_len))
                       if self.num_sequences else np.zeros((0, self.seq_len), self._dtype))
        self.seq_domains = np.load(DataFiles(self.dir).index(self.split, "seq_domains"), mmap_mode="r")
        handle = getattr(self.tokens, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_RANDOM"):  # rows are read at random: no fault-around of
            handle.madvise(mmap.MADV_RANDOM)  # neighbouring pages (64 kB each) into this process's memory

    def release(self) -> None:
        """Drop the pages of the token file and labels that this process has read. Pages read through a
        mapping count as the process's memory until dropped; the OS keeps them cached all the same."""
        for array in (self.tokens, self.seq_domains):
            handle = getattr(array, "_mmap", None)
            if handle is not None and hasattr(handle, "madvise"):
                handle.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[index])

    def batch(self, ids: np.ndarray, length: int | None = None) -> np.ndarray:
        """Sequences `ids` (first `length` tokens) as an int64 array, ready for torch.from_numpy. The pages
        read are dropped from this process afterwards (they stay in the OS page cache): a pass over a token
        file larger than RAM holds one batch of it, not every page it has touched."""
        rows = self.tokens[np.asarray(ids)]
        out = np.ascontiguousarray(rows[:, :length] if length else rows, dtype=np.int64)
        self.release()
        return out

    def order(self, epoch: int = 0) -> SequenceOrder:
        """The split's seeded sequence order (epoch > 0: a fresh one for another pass over the data).
        Chunks and samples are ranges of it, never "the first n" of the file."""
        seed = self.manifest.get("order", {}).get("seed", 0)
        return SequenceOrder(self.num_sequences, (seed, SPLITS.index(self.split), epoch))

    def sample(self, k: int | None) -> np.ndarray:
        """Sorted ids of k sequences drawn by the split's order (all of them when k is None or >= n)."""
        if k is None or k >= self.num_sequences:
            return np.arange(self.num_sequences)
        return np.sort(self.order().sample(k))

    @property
    def has_domains(self) -> bool:
        """Labels exist (read from the manifest: scanning a 10^9-entry label file would page it all in)."""
        return bool(self.domain_names)
