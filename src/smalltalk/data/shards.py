"""Packed token shards: documents joined with end-of-text, cut into fixed-length sequences on disk.

Layout of RUN/data/ (one set of files per split):
  {split}.bin              uint16/uint32 tokens; sequence i is tokens[i*S:(i+1)*S] (O(1) random access)
  {split}.doc_starts.npy   int64 token offset of every document start
  {split}.doc_domains.npy  int16 domain id per document (-1: unlabelled)
  {split}.seq_domains.npy  int16 domain id of each sequence (the domain of its first token)
  manifest.json            counts, vocab, seq_len, dtype, sha256 of every .bin, domain names
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np

from smalltalk.data.ingest import SPLITS
from smalltalk.data.order import SequenceOrder
from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import DataFiles, manifest_of

FORMAT_VERSION = 1


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


def release_pages(*arrays: np.ndarray) -> None:
    """Drop the pages of memory-mapped arrays from this process. Pages read or written through a mapping
    count as the process's memory until dropped; the OS keeps them cached (and writes back dirty pages of
    a shared mapping) all the same. Arrays that are not mappings are skipped."""
    for array in arrays:
        handle = getattr(array, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)


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
        """Drop the pages of the token file and labels that this process has read."""
        release_pages(self.tokens, self.seq_domains)

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
