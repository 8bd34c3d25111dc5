"""Encoded examples as the trainer reads them: right-padded rows of tokens and labels (-100: no loss).

Padding sits after the example, so causal attention never lets a real token see it, and its labels are
-100: no attention mask is needed. Pre-training sequences mixed in (replay) are rows whose labels are
their tokens. Rows are small (one example each) and few (instruction sets): plain .npy files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smalltalk.fsutil import atomic_dir, read_json, write_json
from smalltalk.layout import SFTFiles, manifest_of

IGNORE = -100


def pack_rows(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) [N, seq_len]; examples longer than seq_len must have been cut by the caller."""
    tokens = np.full((len(encoded), seq_len), pad, np.int32)
    labels = np.full((len(encoded), seq_len), IGNORE, np.int32)
    for i, (ids, mask) in enumerate(encoded):
        tokens[i, :len(ids)] = ids
        labels[i, :len(ids)] = np.where(np.asarray(mask, bool), ids, IGNORE)
    return tokens, labels


def write_rows(out: Path, tokens: np.ndarray, labels: np.ndarray, vocab_size: int, info: dict) -> None:
    with atomic_dir(out) as tmp:
        np.save(SFTFiles.rows(tmp, "tokens"), tokens)
        np.save(SFTFiles.rows(tmp, "labels"), labels)
        write_json(manifest_of(tmp), {"rows": len(tokens), "seq_len": tokens.shape[1], "vocab_size": vocab_size,
                                      **info})


class SFTData:
    """What `train()` reads: batch(ids, length) -> tokens, labels(ids, length) -> labels (int64)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir)
        self.manifest = read_json(manifest_of(self.dir))
        self.tokens = np.load(SFTFiles.rows(self.dir, "tokens"), mmap_mode="r")
        self.label_rows = np.load(SFTFiles.rows(self.dir, "labels"), mmap_mode="r")
        self.seq_len, self.vocab_size = self.tokens.shape[1], self.manifest["vocab_size"]

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, ids: np.ndarray, length: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.tokens[np.asarray(ids), :length], dtype=np.int64)

    def labels(self, ids: np.ndarray, length: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.label_rows[np.asarray(ids), :length], dtype=np.int64)
