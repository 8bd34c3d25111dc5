"""What every stage verb shares: --config/--set/--run, and the config they resolve to."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from smalltalk.config import Config, load_config
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: RUN/config.json when the run has one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    # --run-dir is the same option; use it under torchrun, whose own parser mistakes --run for --run-path.
    parser.add_argument("--run", "--run-dir", dest="run", help="run directory (overrides run_dir)")


def load(args: argparse.Namespace) -> tuple[Config, RunLayout]:
    """The config of a command: --config, else the run's own RUN/config.json (so a later stage, a child
    job or a SLURM task sees the settings the run was made with), else the defaults; then --set, --run."""
    path = args.config
    if path is None and args.run and RunLayout(Path(args.run)).config_file.is_file():
        path = str(RunLayout(Path(args.run)).config_file)
    cfg = load_config(path, args.set)
    if args.run:
        cfg.run_dir = args.run
    return cfg, RunLayout(Path(cfg.run_dir))


def add_split(parser: argparse.ArgumentParser) -> None:
    """--split (validation by default: what every choice is made on) and --final (the test split, once, for a
    final table): the only way a command reads the test split."""
    def not_test(value: str) -> str:
        if value == "test":
            raise argparse.ArgumentTypeError("the test split is read only with --final (once, for a final table); "
                                             "every choice is made on validation")
        return value
    parser.add_argument("--split", type=not_test, choices=("train", "validation"), default="validation",
                        help="split to read (default validation; the test split only with --final)")
    parser.add_argument("--final", action="store_true", help="read the test split, once, for a final table")


def chosen_split(args: argparse.Namespace) -> str:
    return "test" if args.final else args.split


def is_main_rank() -> bool:
    """Under torchrun only rank 0 prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def path_or(value: str | None, default: Path) -> Path:
    """A --data/--out style option, or the run's default location."""
    return Path(value) if value else default


def parse_part(text: str) -> tuple[int, int]:
    """`--part K/P`: part K (0-based) of P equal parts."""
    part, sep, parts = text.partition("/")
    if not sep or not part.isdigit() or not parts.isdigit() or int(parts) < 1:
        raise SmalltalkError(f"--part {text!r} is not K/P", fix="e.g. --part 0/8 (part K of P equal parts)")
    return int(part), int(parts)
