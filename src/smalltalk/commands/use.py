"""Verbs that use a trained mixture: `generate`, `export`, `serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.layout import RunLayout


def cmd_export(args: argparse.Namespace) -> None:
    from smalltalk.mixture.export import export_mixture

    out = export_mixture(RunLayout(Path(args.run)), Path(args.out), args.force, args.format, args.top_k,
                         args.temperature)
    print(f"exported ({args.format}) -> {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from smalltalk.mixture.model import SmallTalkMixture

    prompt = Path(args.file).read_text() if args.file else args.prompt
    if not prompt:
        raise SmalltalkError("no prompt", fix="pass a prompt string or --file FILE")
    mixture = SmallTalkMixture.from_pretrained(args.run, args.device)
    sample = args.temperature > 0
    streamer = TextStreamer(mixture.tokenizer, skip_prompt=True) if args.stream and not args.reroute_at else None
    torch.manual_seed(args.seed)  # routing draws no random numbers: the seed decides the sampled text alone
    out = mixture.generate(prompt, args.max_new_tokens, args.prefix, reroute_at=args.reroute_at, do_sample=sample,
                           temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                           streamer=streamer)
    if args.reroute_at:
        print(f"[experts {' -> '.join(f'{k:02d}' for k in out['experts'])} (re-routed at {args.reroute_at} "
              "tokens)]", file=sys.stderr)
    else:
        ranked = sorted(out["scores"], reverse=True)
        margin = ranked[0] - ranked[1] if len(ranked) > 1 else float("inf")
        print(f"[expert {out['expert']:02d}, router margin {margin:.2f} nats over the runner-up]", file=sys.stderr)
    if streamer is None:
        print(out["text"])


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from smalltalk.serving.server import serve, server_settings

    key = args.api_key if args.api_key is not None else os.environ.get("SMALLTALK_API_KEY")  # "" stays "": refused
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise SmalltalkError("the API key file is empty", where=args.api_key_file)
    elif args.api_key:
        print("warning: --api-key is visible to every user in `ps`; prefer SMALLTALK_API_KEY or --api-key-file",
              file=sys.stderr)
    engine, urls = args.engine, None
    if args.backend == "openai":
        from smalltalk.serving.remote import parse_expert_urls

        if args.expert is not None:
            raise SmalltalkError("--expert serves one expert locally; it cannot be combined with --backend openai")
        experts = RunLayout(Path(args.run)).mixture()["experts"]
        urls, engine = parse_expert_urls(args.expert_url or [], experts), "openai"
    elif args.expert_url:
        raise SmalltalkError("--expert-url needs --backend openai")
    if args.expert is not None:
        experts = RunLayout(Path(args.run)).mixture()["experts"]
        if not 0 <= args.expert < experts or args.engine == "serial":
            raise SmalltalkError(f"--expert {args.expert}: the mixture has experts 0..{experts - 1}, and --expert "
                                 "needs the batched engine")
    settings = server_settings(args.run, key, args.max_resident_experts, args.model_name, args.device,
                               args.max_body_bytes, args.max_queue, engine, args.max_batch, args.expert, urls,
                               os.environ.get("SMALLTALK_BACKEND_API_KEY") or None,
                               client_timeout=args.client_timeout, request_timeout=args.request_timeout,
                               max_connections=args.max_connections)
    if key is None and not _loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              "mixture; set SMALLTALK_API_KEY or --api-key-file", file=sys.stderr)
    if args.workers > 1:
        from smalltalk.serving.workers import run_workers

        run_workers(settings, args.workers, args.host, args.port)
    else:
        serve(settings, args.host, args.port)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(sub) -> None:
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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a self-contained mixture directory (default: the Hugging Face layout)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("hf", "smalltalk"), default="hf",
                   help="hf: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) loads it; smalltalk: "
                        "our layout, what `smalltalk serve/eval/generate --run OUT` read")
    p.add_argument("--top-k", type=int, default=1, help="hf: mix the top k experts (c-BTM); 1: the paper")
    p.add_argument("--temperature", type=float, default=1.0, help="hf: softmax temperature of the top-k weights")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a mixture")
    p.add_argument("--run", required=True, help="run directory or exported mixture")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set SMALLTALK_API_KEY)")
    p.add_argument("--api-key-file", help="read the key from this file (not visible in `ps`)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before 503 + Retry-After")
    p.add_argument("--max-resident-experts", type=int, help="LRU bound on experts kept in memory (the batched "
                   "engine also runs at most this many experts' batches at once)")
    p.add_argument("--client-timeout", type=float, default=30.0, help="seconds a client may take to send its "
                   "headers or body, or to read the next chunk of a stream, before it is dropped")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all; "
                   "its generation is cancelled then (504)")
    p.add_argument("--max-connections", type=int, help="open connections before 503 (default: max-queue + 64)")
    p.add_argument("--model-name", default="smalltalk")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on the port, each with its own copy "
                   "of the mixture; /metrics sums them (docs/serving.md)")
    p.add_argument("--engine", choices=("batched", "serial"), default="batched",
                   help="batched: continuous batching per expert (default); serial: one HF generate at a time")
    p.add_argument("--max-batch", type=int, default=64, help="rows generated together per expert (batched engine)")
    p.add_argument("--expert", type=int, help="serve only this expert, as a plain model without routing (a backend "
                   "for --backend openai)")
    p.add_argument("--backend", choices=("local", "openai"), default="local",
                   help="openai: route here, generate on the OpenAI-compatible servers given by --expert-url "
                   "(key for them: SMALLTALK_BACKEND_API_KEY)")
    p.add_argument("--expert-url", action="append", metavar="K=URL",
                   help="expert K's server, e.g. 0=http://10.0.0.5:8000/v1 (once per expert)")
    p.set_defaults(func=cmd_serve)
