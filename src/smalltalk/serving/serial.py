"""The reference engine: one HF `generate` at a time behind a lock (`serve --engine serial`).

Kept as the baseline `benchmarks/speed/bench_serve.py` measures the batching engine against, and as the
simplest correct thing: the sampled text is exactly HF `generate`'s with `torch.manual_seed(seed)`.
Routing shares the lock: on a few CPU cores, running it beside a generation only oversubscribes the
cores (measured: 37 ms p50 instead of ~3 ms).
"""

from __future__ import annotations

import threading

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.engine import OnText, RoutesEachPrompt
from smalltalk.serving.logprobs import prompt_entries, token_entries
from smalltalk.serving.protocol import Cancelled, StopText, TextDecoder, Validator, route_on


class _StopWhen(StoppingCriteria):
    """A transformers stopping criterion: stop every row once `event` is set or a stop string appeared."""

    def __init__(self, event: threading.Event, sink: _TextSink) -> None:
        self.event, self.sink = event, sink

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.event.is_set() or self.sink.text.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _TextSink:
    """An HF streamer (put/end) that turns each new token into text (cut at a stop string) for `on_text`."""

    def __init__(self, text: StopText, on_text: OnText) -> None:
        self.text, self.on_text, self.prompt_seen = text, on_text, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            piece = self.text.push(int(token))
            if piece and self.on_text is not None:
                self.on_text(piece)

    def end(self) -> None:
        rest = self.text.finish()
        if rest and self.on_text is not None:
            self.on_text(rest)


class SerialEngine(RoutesEachPrompt):
    def __init__(self, mixture: SmallTalkMixture, model_name: str, max_tokens_limit: int,
                 max_queue: int = 256) -> None:
        context = mixture.expert(0).config.max_position_embeddings
        super().__init__(Validator(mixture.tokenizer, model_name, context, max_tokens_limit,
                                   route_on(mixture)), mixture, max_queue)
        self.lock = self._route_lock  # one request at a time: routing and generation share the lock

    def generate(self, req: dict, routing: dict, on_text: OnText = None) -> tuple[str, str, int]:
        cancel = req["cancel"]
        while not self.lock.acquire(timeout=0.05):
            if cancel.is_set():
                raise Cancelled()
        try:
            sink = _TextSink(StopText(TextDecoder(self.mixture.tokenizer), req.get("stop") or []), on_text)
            model = self.mixture.expert(routing["expert"])
            ids = req["ids"].to(self.mixture.device)
            if req.get("echo"):  # the prompt's own log-probs
                with torch.inference_mode():
                    logits = model(input_ids=ids).logits[0, :-1].cpu()
                req["prompt_logprobs"] = prompt_entries(logits, req["ids"][0].tolist(), req["logprobs"] or 0)
            if req["max_tokens"] == 0:
                return "", "length", 0
            if req["seed"] is not None:
                torch.manual_seed(req["seed"])
            sample = req["temperature"] > 0
            eos = self.mixture.tokenizer.eos_token_id
            scored = req.get("logprobs") is not None
            out = model.generate(ids, max_new_tokens=req["max_tokens"], return_dict_in_generate=True,
                                 output_logits=scored,
                                 do_sample=sample, temperature=req["temperature"] if sample else None,
                                 top_p=req["top_p"] if sample else None, streamer=sink,
                                 stopping_criteria=StoppingCriteriaList([_StopWhen(cancel, sink)]),
                                 pad_token_id=eos, eos_token_id=eos)
        finally:
            self.lock.release()
        if cancel.is_set():
            raise Cancelled()
        new = out.sequences[0, req["ids"].shape[1]:]
        if scored:  # raw logits of each step (before temperature and top-p)
            req["token_logprobs"] = token_entries(torch.cat([step.cpu() for step in out.logits]), new.tolist(),
                                                  req["logprobs"])
        eos = self.mixture.tokenizer.eos_token_id
        finish = "stop" if sink.text.stopped or (len(new) and int(new[-1]) == eos) else "length"
        return sink.text.result, finish, len(new)

    def gauges(self) -> dict:
        return {"resident_experts": len(self.mixture.resident_experts), "expert_loads": self.mixture.loads,
                "batched_rows": 0}

    def health(self) -> dict:
        return {"experts": self.mixture.num_experts, "resident": self.mixture.resident_experts}
