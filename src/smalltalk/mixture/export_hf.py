"""`smalltalk export --format hf`: the mixture as one Hugging Face model directory.

DIR/ config.json (model_type smalltalk_mixture, auto_map, E, M̂, routing dtype, top-k, the router and expert
configs)  model.safetensors (routers.K.* and experts.K.*; n-gram routers: their count tables routers.pairs,
routers.contexts, routers.unigrams)  configuration_smalltalk.py  modeling_smalltalk.py
(copied from smalltalk.hub: torch and transformers only)  tokenizer files  generation_config.json
README.md (the model card). `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it in
any process with transformers, without our package.
"""

from __future__ import annotations

from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import atomic_dir, read_json
from smalltalk.layout import MODEL_CARD, RouterFiles, RunLayout, manifest_of


def router_model_dirs(run: RunLayout, manifest: dict) -> list[Path]:
    """The router LM of each expert, in expert order (elastic pairs list theirs in router_dirs)."""
    if manifest.get("router_dirs"):
        return [run.root / rel for rel in manifest["router_dirs"]]
    routers = read_json(manifest_of(run.mixture_routers()))
    if routers["method"] != "em":
        raise SmalltalkError(f"the Hugging Face export carries router LMs or n-gram tables; this mixture routes "
                             f"by {routers['method']}", fix="export it with --format smalltalk (our layout), or "
                                                            "route with routing.method=em or ngram")
    return [RouterFiles(run.mixture_routers()).router(name).model for name in routers["routers"]]


def _routers(run: RunLayout, manifest: dict) -> tuple[str, dict, object]:
    """(router_method, router_config, the routers: a list of router LMs, or the n-gram routers' tables)."""
    from transformers import AutoModelForCausalLM

    if manifest["method"] == "ngram":
        from smalltalk.routing.routers import load_router_dirs, load_routers

        tables = (load_router_dirs("ngram", [run.root / rel for rel in manifest["router_dirs"]])
                  if manifest.get("router_dirs") else load_routers(run.mixture_routers()))
        return "ngram", {"vocab_size": tables.vocab_size, "order": tables.order, "prior": tables.prior,
                         "pair_size": tables.pairs.shape[1], "context_size": tables.contexts.shape[1]}, tables
    models = [AutoModelForCausalLM.from_pretrained(str(d)) for d in router_model_dirs(run, manifest)]
    return "em", plain_config(models[0].config), models


def plain_config(config) -> dict:
    """A model's config as a dict, without where its weights came from (the run's business, not the export's)."""
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def build_hf_model(run: RunLayout, top_k: int = 1, temperature: float = 1.0):
    """The SmallTalkForCausalLM of a run or exported mixture (weights copied from its routers and experts)."""
    import torch
    from transformers import AutoModelForCausalLM

    from smalltalk.hub.configuration_smalltalk import SmallTalkConfig
    from smalltalk.hub.modeling_smalltalk import SmallTalkForCausalLM

    manifest = run.mixture()
    if not 1 <= top_k <= manifest["experts"] or temperature <= 0:
        raise SmalltalkError(f"--top-k {top_k} --temperature {temperature}",
                             fix=f"top-k in [1, {manifest['experts']}], temperature > 0")
    method, router_config, routers = _routers(run, manifest)
    experts = [AutoModelForCausalLM.from_pretrained(str(run.root / d)) for d in manifest["expert_dirs"]]
    shapes = {tuple(sorted((k, str(v)) for k, v in plain_config(m.config).items())) for m in experts}
    if len(shapes) > 1:
        raise SmalltalkError("the experts differ in architecture; one Hugging Face config cannot describe them",
                             fix="export with --format smalltalk")
    config = SmallTalkConfig(num_experts=manifest["experts"], routing_prefix=run.prefix(),
                             routing_dtype=manifest.get("routing_dtype", "float32"), routing_top_k=top_k,
                             routing_temperature=temperature, expert_config=plain_config(experts[0].config),
                             router_config=router_config, router_method=method,
                             architectures=["SmallTalkForCausalLM"])
    model = SmallTalkForCausalLM(config)
    for target, source in zip(model.experts, experts, strict=True):
        target.load_state_dict(source.state_dict())
    if method == "ngram":  # the count tables, in the float32 the package scores them in
        for name in ("pairs", "contexts", "unigrams"):
            getattr(model.routers, name).copy_(torch.from_numpy(getattr(routers, name)))
    else:
        for target, source in zip(model.routers, routers, strict=True):
            target.load_state_dict(source.state_dict())
    return model.eval()


def export_hf(run: RunLayout, out: Path, top_k: int = 1, temperature: float = 1.0) -> Path:
    """Write `run`'s mixture to `out` in the Hugging Face layout (atomically)."""
    from transformers import GenerationConfig

    from smalltalk.mixture.model_card import model_card

    model = build_hf_model(run, top_k, temperature)
    manifest = run.mixture()
    tokenizer_dir = run.root / manifest["tokenizer"]
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # config.json with auto_map, weights, and the two code files
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if tokenizer.pad_token is None:  # batches pad with end-of-text, as `smalltalk` does
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(tmp)  # with its class named: AutoTokenizer then needs no remote code
        # as `smalltalk generate`: pad with the end-of-text token, no early stop (the experts' configs set none)
        GenerationConfig(pad_token_id=tokenizer.eos_token_id).save_pretrained(tmp)  # lengths: the caller's
        (tmp / MODEL_CARD).write_text(model_card(run, manifest, hf=True))
    return out
