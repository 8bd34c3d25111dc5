"""The routing methods: the one table from `routing.method` to the trainer that fills a routers directory.

A new router kind is a trainer here (writing RUN/routers/manifest.json with its `method`) plus a loader
in routing/routers.py that turns that directory back into a `Router`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smalltalk.config import ROUTING_METHODS, Config
from smalltalk.errors import SmalltalkError


def _em(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    from smalltalk.routing.em import train_em_routers

    return train_em_routers(cfg, data_dir, out_dir)


def _ngram(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    from smalltalk.routing.em import train_ngram_routers

    return train_ngram_routers(cfg, data_dir, out_dir)


def _tfidf(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    from smalltalk.routing.baselines import train_tfidf_router

    return train_tfidf_router(cfg, data_dir, out_dir)


def _random(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    from smalltalk.routing.baselines import train_random_router

    return train_random_router(cfg, data_dir, out_dir)


def _oracle(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    from smalltalk.routing.baselines import train_oracle_router

    return train_oracle_router(cfg, data_dir, out_dir)


# oracle: routing by domain label, an upper bound for studies (not servable: a prompt has no label)
TRAINERS: dict[str, Callable[[Config, Path, Path], dict]] = {"em": _em, "ngram": _ngram, "tfidf": _tfidf,
                                                             "random": _random, "oracle": _oracle}
METHODS = ROUTING_METHODS
assert set(TRAINERS) == set(METHODS), "every routing method in config.ROUTING_METHODS needs a trainer here"


def train_routers(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    """Train the routers of `cfg.routing.method` on `data_dir`; returns the routers manifest."""
    method = cfg.routing.method
    if method not in TRAINERS:
        raise SmalltalkError(f"unknown routing method {method!r}", where="routing.method",
                             fix=f"use one of {', '.join(METHODS)}")
    return TRAINERS[method](cfg, Path(data_dir), Path(out_dir))
