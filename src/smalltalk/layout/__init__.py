"""The run directory and every file name in it: the one package that spells them, and the readers over them.

  RUN/config.json       the resolved config; every job of the run reads it (child jobs too)
  RUN/stages.json       per finished stage: the config digest it was made with, and its seconds
  RUN/tokenizer/        tokenizer.json, manifest.json
  RUN/data/             SPLIT.bin (packed tokens) + SPLIT.{doc_starts,doc_domains,seq_domains}.npy, manifest.json
  RUN/routers/          NN/ (one router LM: a training output) or tfidf.pkl + tokenizer.json;
                        em_state.json, em_history.json, shares/ (EM resume state); manifest.json
  RUN/partition/        expert_NN.npy (sorted train-sequence ids of expert NN), manifest.json
  RUN/experts/NN/       a training output per expert      RUN/dense/{matched,bigger}/  training outputs
  RUN/experts-data/NN/  expert NN's share (+ a validation sample) as prepared data: all an expert job needs
  RUN/eval/results.json RUN/report/ (report.md, index.html, PNGs)
  RUN/mixture.json      what the mixture is made of (experts, routers, tokenizer, prefix): generate/serve/export
  RUN/jobs/             experts-NN.json (job record), experts-NN.log, STAGE.sbatch
  RUN/added/NN/         data/: the prepared documents of an elastic pair (`experts add`); pending.json while
                        it trains (mixture.json changes only once the pair is done)

A training output (training/trainer.py): model/ (HF), checkpoints/step_NNNNNNNN/, metrics.jsonl, train_manifest.json.
An artifact directory is complete when its manifest exists: it is written last, atomically.

artifacts.py names the files inside one artifact directory; run.py where the directories lie in a run.
"""

from smalltalk.layout.artifacts import (
    CORPUS_STATS,
    DENSE_KINDS,
    HF_CONFIG,
    MANIFEST,
    MODEL_CARD,
    REPORT_PLOTS,
    STEP_DIR,
    TRAINER_STATE,
    WEIGHTS,
    WEIGHTS_INDEX,
    DataFiles,
    PartitionFiles,
    Parts,
    RouterFiles,
    SFTFiles,
    TokenizerFiles,
    TrainFiles,
    manifest_of,
    read_manifest,
)
from smalltalk.layout.run import RunLayout

__all__ = [
    "CORPUS_STATS", "DENSE_KINDS", "HF_CONFIG", "MANIFEST", "MODEL_CARD", "REPORT_PLOTS",
    "STEP_DIR", "TRAINER_STATE", "WEIGHTS", "WEIGHTS_INDEX", "DataFiles", "PartitionFiles", "Parts", "RouterFiles",
    "SFTFiles",
    "TokenizerFiles", "TrainFiles", "manifest_of", "read_manifest", "RunLayout",
]
