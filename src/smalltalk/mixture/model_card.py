"""The README of an exported mixture: what it is, how to load it, how it was trained, the run's figures."""

from __future__ import annotations

from smalltalk.layout import RunLayout


def model_card(run: RunLayout, manifest: dict, hf: bool = False) -> str:
    """The README of an export: what the mixture is, how to load it, how it was trained, its figures."""
    usage = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
             "tokenizer = AutoTokenizer.from_pretrained(DIR)",
             "out = model(**tokenizer(['def parse('], return_tensors='pt'))",
             "out.routed_experts  # the expert each row went to", "```"] if hf else [
             "```python", "from smalltalk.mixture.model import SmallTalkMixture",
             "mixture = SmallTalkMixture.from_pretrained('.')", "```", "",
             "Each `experts/NN/model` is a plain Hugging Face `LlamaForCausalLM`; `tokenizer/` loads with "
             "`AutoTokenizer`."]
    lines = [f"# SmallTalk LM mixture: {run.root.name}", "",
             f"{manifest['experts']} experts routed by {manifest['method']} routers on the first "
             f"{manifest['prefix']} tokens (argmax of router log-likelihoods), after SmallTalk LM (Filippova et "
             "al., \"No Need to Talk: Asynchronous Mixture of Language Models\", ICLR 2025): each expert trained "
             "alone on the sequences its router claimed.", "", *usage, "", *_training(run)]
    for eval_dir in (run.eval_final, run.eval):  # the final table when there is one
        if run.results_table(eval_dir).is_file():
            lines += ["## Evaluation of the training run", "", run.results_table(eval_dir).read_text(), ""]
            break
    return "\n".join(lines) + "\n"


def _training(run: RunLayout) -> list[str]:
    """How the run was trained: the data, the routing, where the experts started (its departures named)."""
    config = run.config()
    if not config:
        return []
    routing, experts = config["routing"], config["experts"]
    departures = [f"{k}={routing[k]}" for k, paper in (("init_split", "random"), ("method", "em"))
                  if routing.get(k, paper) != paper]
    if experts.get("init", "scratch") != "scratch":
        departures.append(f"experts.init={experts['init']}")
    return ["## Training", "", f"- data: {', '.join(config['data']['inputs'])} (sequences of "
            f"{config['data']['seq_len']} tokens, vocabulary {config['tokenizer']['vocab_size']})",
            f"- routing: {routing['method']}, {routing['experts']} experts, prefix {routing['prefix']}, "
            f"{routing['rounds']} EM rounds of {routing['chunk']} sequences",
            f"- experts: preset {config['model'].get('preset')}, {config['train']['steps']} steps of "
            f"{config['train']['micro_batch_size']} sequences",
            "- departures from the paper: " + (", ".join(departures) or "none"), ""]
