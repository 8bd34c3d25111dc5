"""One expert's job: it trains on its partition share only, as a self-contained job (own process,
checkpoints, logs): nothing is shared with the other experts at run time. It starts where experts.init says
(experts/start.py)."""

from __future__ import annotations

from pathlib import Path

from smalltalk.config import Config
from smalltalk.data.shards import SplitData, write_subset
from smalltalk.errors import SmalltalkError
from smalltalk.experts.start import expert_spec, expert_train_config, start_model
from smalltalk.layout import RunLayout, manifest_of
from smalltalk.routing.partition import load_share
from smalltalk.training.trainer import TrainJob, train


def train_expert(cfg: Config, run: RunLayout, index: int, resume: bool = True) -> dict:
    """Train expert `index` on its share (resumes from its checkpoints when present). Reads RUN/experts-data/KK
    when `smalltalk experts data` wrote it (then RUN/data and RUN/partition need not be on this machine),
    else its share's ids of RUN/data: the same tokens in the same order either way."""
    start = start_model(cfg, run)  # first: a wrong checkpoint or a missing trunk fails before any data is read
    own = run.expert_data(index)
    if manifest_of(own).is_file():
        data, val, ids = SplitData(own, "train"), SplitData(own, "validation"), None
    else:
        experts = run.num_experts()
        if not 0 <= index < experts:
            raise SmalltalkError(f"expert {index} does not exist (the partition has {experts})")
        data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
        ids = load_share(run.partition, index)
    job = TrainJob(expert_spec(cfg, data.vocab_size), expert_train_config(cfg, index), data, run.expert(index),
                   ids=ids, val=val if len(val) else None, name=f"expert {index:02d}", init_from=start)
    return train(job, resume=resume)


def write_expert_data(cfg: Config, run: RunLayout, experts: list[int] | None = None) -> list[Path]:
    """Each expert's share of RUN/data, plus the validation sample its trainer scores, as RUN/experts-data/KK:
    copy that directory (and RUN/config.json) to a machine and the expert trains there without the corpus."""
    data, val = SplitData(run.data, "train"), SplitData(run.data, "validation")
    val_ids = val.sample(cfg.train.eval_batches * cfg.train.micro_batch_size)  # what train's _val_loss draws
    written = []
    for k in range(run.num_experts()) if experts is None else experts:
        write_subset(data, load_share(run.partition, k), run.expert_data(k), val, val_ids)
        written.append(run.expert_data(k))
    return written
