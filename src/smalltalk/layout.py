"""The run directory: one sub-directory per stage, each with a JSON manifest.

  RUN/config.yaml  tokenizer/  data/  routers/  partition/  experts/NN/  dense/  eval/  mixture.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def routers(self) -> Path:
        return self.root / "routers"

    @property
    def partition(self) -> Path:
        return self.root / "partition"

    def expert(self, index: int) -> Path:
        return self.root / "experts" / f"{index:02d}"

    @property
    def dense(self) -> Path:
        return self.root / "dense"

    @property
    def lm(self) -> Path:
        return self.root / "lm"

    @property
    def eval(self) -> Path:
        return self.root / "eval"
