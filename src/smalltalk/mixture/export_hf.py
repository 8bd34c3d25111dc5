"""`smalltalk export --format hf`: the mixture as one Hugging Face model directory.

DIR/ config.json (model_type smalltalk_mixture, auto_map, E, M̂, routing dtype, top-k, the router and expert
configs)  model.safetensors (routers.K.* and experts.K.*)  configuration_smalltalk.py  modeling_smalltalk.py
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
        raise SmalltalkError(f"the Hugging Face export carries router LMs; this mixture routes by "
                             f"{routers['method']}", fix="export it with --format smalltalk (our layout), or "
                                                         "train EM routers (routing.method=em)")
    return [RouterFiles(run.mixture_routers()).router(name).model for name in routers["routers"]]


def build_hf_model(run: RunLayout, top_k: int = 1, temperature: float = 1.0):
    """The SmallTalkForCausalLM of a run or exported mixture (weights copied from its routers and experts)."""
    from transformers import AutoModelForCausalLM

    from smalltalk.hub.configuration_smalltalk import SmallTalkConfig
    from smalltalk.hub.modeling_smalltalk import SmallTalkForCausalLM

    manifest = run.mixture()
    if not 1 <= top_k <= manifest["experts"] or temperature <= 0:
        raise SmalltalkError(f"--top-k {top_k} --temperature {temperature}",
                             fix=f"top-k in [1, {manifest['experts']}], temperature > 0")
    routers = [AutoModelForCausalLM.from_pretrained(str(d)) for d in router_model_dirs(run, manifest)]
    experts = [AutoModelForCausalLM.from_pretrained(str(run.root / d)) for d in manifest["expert_dirs"]]
    shapes = {tuple(sorted((k, str(v)) for k, v in m.config.to_dict().items() if k != "_name_or_path"))
              for m in experts}
    if len(shapes) > 1:
        raise SmalltalkError("the experts differ in architecture; one Hugging Face config cannot describe them",
                             fix="export with --format smalltalk")
    def plain(config) -> dict:  # where the weights came from is the run's business, not the export's
        return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}

    config = SmallTalkConfig(num_experts=manifest["experts"], routing_prefix=run.prefix(),
                             routing_dtype=manifest.get("routing_dtype", "float32"), routing_top_k=top_k,
                             routing_temperature=temperature, expert_config=plain(experts[0].config),
                             router_config=plain(routers[0].config),
                             architectures=["SmallTalkForCausalLM"])
    model = SmallTalkForCausalLM(config)
    for group, sources in ((model.routers, routers), (model.experts, experts)):
        for target, source in zip(group, sources, strict=True):
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
