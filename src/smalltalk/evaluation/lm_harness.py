"""lm-evaluation-harness model "smalltalk": each request is routed on its context, then scored by one expert.

Routing rule: the first M tokens (M = the mixture's prefix) of the request's *context* pick the expert;
for `loglikelihood_rolling`, of the text itself. All choices of a multiple-choice item share a context, so
they go to the same expert and their log-likelihoods are comparable. Contexts shorter than 2 tokens are
routed with the continuation's first tokens appended (the router needs one scored token).

  smalltalk eval downstream --run RUN --tasks TASK [--include-path DIR]
  python -m smalltalk.evaluation.lm_harness --model smalltalk --model_args run=RUN --tasks TASK --include_path DIR
      (the lm_eval CLI itself, with this model registered; lm-eval has no plugin entry point)
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from smalltalk.mixture.model import SmallTalkMixture


@register_model("smalltalk")
class SmallTalkLM(TemplateLM):
    """Requests are tokenized as lm-eval's own `hf` model does (TemplateLM: the pair encoded whole, then split;
    an empty context becomes end-of-text), so its figures equal `--model hf` on the exported mixture's."""

    backend = "causal"

    def __init__(self, run: str, device: str = "cpu", max_resident: int | None = None, **kwargs) -> None:
        super().__init__()
        self.mixture = SmallTalkMixture.from_pretrained(run, device, max_resident)
        self.tok = self.mixture.tokenizer
        self.max_length = self.mixture.expert(0).config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tok(string, add_special_tokens=False).input_ids

    def _route(self, ids: list[int]) -> int:
        chosen, _ = self.mixture.route([ids[: self.mixture.prefix]])
        return int(chosen[0])

    @torch.inference_mode()
    def _continuation_logprob(self, expert: int, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1):]
        x = torch.tensor([ids[:-1]], device=self.mixture.device)
        logits = self.mixture.expert(expert)(input_ids=x).logits[0, -len(continuation):].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation, device=logits.device)
        total = logprobs.gather(1, target[:, None]).sum().item()
        return total, bool((logprobs.argmax(dim=-1) == target).all())

    def _route_tokens(self, context: list[int], continuation: list[int]) -> int:
        """The expert of a request: its context's first M tokens (shorter than 2: the continuation's first)."""
        ids = context if len(context) >= 2 else context + continuation[: 2 - len(context)]
        return self._route(ids)

    def route_request(self, context: str, continuation: str = "") -> int:
        """The expert a (context, continuation) request goes to (public, for tests and debugging)."""
        if not context:
            return self._route_tokens([self.eot_token_id], self.tok_encode(continuation))
        return self._route_tokens(*self._encode_pair(context, continuation))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._continuation_logprob(self._route_tokens(ctx, cont), ctx, cont) for _, ctx, cont in requests]

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            ids = [self.tok.eos_token_id] + self.tok_encode(request.args[0])
            expert = self.mixture.expert(self._route(ids[1:] if len(ids) > 2 else ids))
            total, start = 0.0, 1
            while start < len(ids):  # disjoint windows of up to max_length predicted tokens
                end = min(len(ids), start + self.max_length)
                window = ids[max(0, end - self.max_length - 1):end]
                x = torch.tensor([window[:-1]], device=self.mixture.device)
                logprobs = torch.log_softmax(expert(input_ids=x).logits[0].float(), dim=-1)
                targets = torch.tensor(window[1:], device=logprobs.device)
                scored = logprobs.gather(1, targets[:, None]).squeeze(1)[-(end - start):]
                total += scored.sum().item()
                start = end
            out.append(total)
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until", []) or []
            until = [until] if isinstance(until, str) else until
            max_new = max(1, min(int(kwargs.get("max_gen_toks", 64)), self.max_length - 1))  # leave room for context
            ids = self.tok_encode(context) or [self.tok.eos_token_id]
            ids = ids[-(self.max_length - max_new):]
            expert = self.mixture.expert(self.route_request(context))
            generated = expert.generate(torch.tensor([ids], device=self.mixture.device), max_new_tokens=max_new,
                                        do_sample=False, pad_token_id=self.tok.eos_token_id,
                                        eos_token_id=self.tok.eos_token_id)
            text = self.tok.decode(generated[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def evaluate_downstream(run: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                        device: str = "cpu", num_fewshot: int | None = None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=SmallTalkLM(run, device), tasks=tasks, task_manager=manager, limit=limit,
                           num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True)


if __name__ == "__main__":  # the full lm_eval CLI with the model registered:
    # python -m smalltalk.evaluation.lm_harness --model smalltalk --model_args run=RUN --tasks T --include_path DIR
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
