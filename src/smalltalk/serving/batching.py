"""The default engine: continuous batching per expert, with routing batched in the same loop.

One scheduler thread owns every forward pass. Each turn of its loop it (1) scores every prompt waiting
for routing in one routers call, (2) lets the routed requests join their expert's running batch (their
prompts prefilled together, left-padded, the new KV cache rows merged into the batch's), and (3) runs one
decode step for each expert that has rows. A row leaves the batch when it ends (end of text, max_tokens,
or its client left), so a long generation never holds a short one back and a new request starts at the
next step instead of after the batch (vLLM's and TGI's continuous batching, on HF's `DynamicCache`).

Why one thread and not a lock per request: on a few CPU cores two concurrent forwards only oversubscribe
the cores, and routing, done between two decode steps, waits at most one step, never a generation.
Sampling is per row with the row's own `torch.Generator` (seeded by the request's seed), so a seeded
request gives the same text alone or in a batch, up to float rounding: padded batches run other kernels,
and a draw that falls within rounding of a token boundary can flip (docs/serving.md measures how often).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from smalltalk.mixture.model import SmallTalkMixture
from smalltalk.serving.engine import Engine, OnText
from smalltalk.serving.logprobs import prompt_entries, token_entries
from smalltalk.serving.protocol import Cancelled, RequestError, StopText, TextDecoder, Validator, route_on


@dataclass
class _Row:
    """One request being generated."""

    req: dict
    expert: int
    on_text: OnText
    decoder: TextDecoder
    generator: torch.Generator
    stops: StopText | None = None  # the request's stop strings (None: none, the text is decoded at the end)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Batch:
    """One expert's running rows: their KV cache, attention mask [B, L] (0 = left padding) and the next
    position and last token of each row."""

    model: torch.nn.Module
    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    cache_kw: str = "past_key_values"  # the model's name for the cache argument, looked up once

def sample_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """The next token of each row: greedy at temperature 0, else nucleus sampling by inverse CDF with one
    uniform draw from the row's own generator (so a row's token does not depend on its batch).

    The CDF runs over the nucleus in token-id order, not in probability order: two nearly equal
    probabilities that a batch's rounding swaps would swap their intervals of the draw, and the same
    seed would pick another token far from any boundary. In id order only a draw within rounding of an
    interval's edge (or a token at the nucleus' edge) can change."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    hot = [i for i, row in enumerate(rows) if row.req["temperature"] > 0]
    if hot:
        temperature = torch.tensor([rows[i].req["temperature"] for i in hot])[:, None]
        top_p = torch.tensor([rows[i].req["top_p"] for i in hot])[:, None]
        probs = torch.softmax(logits[hot] / temperature, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        outside = torch.empty_like(probs, dtype=torch.bool).scatter_(1, order, ordered.cumsum(-1) - ordered >= top_p)
        cdf = probs.masked_fill(outside, 0).cumsum(-1)
        draws = torch.cat([torch.rand(1, generator=rows[i].generator) for i in hot])[:, None] * cdf[:, -1:]
        tokens[hot] = torch.searchsorted(cdf, draws, right=True).clamp(max=cdf.shape[1] - 1).squeeze(1)
    return tokens.tolist()


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.x names the KV cache `cache` (`past_key_values` is deprecated there, the only name before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchedEngine(Engine):
    def __init__(self, mixture: SmallTalkMixture, model_name: str, max_tokens_limit: int, max_queue: int = 256,
                 max_batch: int = 64, fixed_expert: int | None = None) -> None:
        """fixed_expert: serve that one expert as a plain model, no routing (`serve --expert K`)."""
        context = mixture.expert(fixed_expert or 0).config.max_position_embeddings
        super().__init__(Validator(mixture.tokenizer, model_name, context, max_tokens_limit,
                                   route_on(mixture)), max_queue)
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.mixture, self.max_batch, self.fixed_expert = mixture, max_batch, fixed_expert
        self.max_active = mixture.max_resident or None  # experts with a running batch (or loading) at once
        self.eos = mixture.tokenizer.eos_token_id
        self._loading: dict[int, Future] = {}  # expert -> its load on the loader thread
        self._loader = ThreadPoolExecutor(1, "smalltalk-expert-loader")
        self._to_route: list[dict] = []
        self._to_join: list[_Row] = []
        self._batches: dict[int, _Batch] = {}
        self._wake = threading.Condition()
        self._closed = False
        self.peak_rows = 0  # the most rows one decode step has carried (tests check that batches form)
        self._thread = threading.Thread(target=self._loop, name="smalltalk-batching", daemon=True)
        self._thread.start()

    # ---- the app's side (any thread) -------------------------------------------------------------------
    def route(self, req: dict) -> dict:
        if self.fixed_expert is not None:
            return {"expert": self.fixed_expert, "scores": [], "routing_ms": 0.0}
        req["routed"] = threading.Event()
        self._submit(self._to_route, req)
        while not req["routed"].wait(0.05):
            if req["cancel"].is_set():
                raise Cancelled()
        if "routing_error" in req:
            raise RequestError(500, req["routing_error"], None, "routing_failed")
        return req["routing"]

    def generate(self, req: dict, routing: dict, on_text: OnText = None) -> tuple[str, str, int]:
        seed = req["seed"] if req["seed"] is not None else int.from_bytes(os.urandom(8), "little") >> 1
        decoder = TextDecoder(self.mixture.tokenizer)
        row = _Row(req, routing["expert"], on_text, decoder, torch.Generator().manual_seed(seed),
                   StopText(decoder, req["stop"]) if req.get("stop") else None)
        self._submit(self._to_join, row)
        row.done.wait()
        if row.error is not None:
            raise RequestError(500, row.error, None, "generation_failed")
        if row.finish == "cancelled":
            raise Cancelled()
        text = row.stops.result if row.stops else self.mixture.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return text, row.finish, len(row.tokens)

    def _submit(self, queue: list, item) -> None:
        with self._wake:
            if self._closed:
                raise RequestError(503, "the server is shutting down", None, "shutting_down")
            queue.append(item)
            self._wake.notify()

    def gauges(self) -> dict:
        return {"resident_experts": len(self.mixture.resident_experts), "expert_loads": self.mixture.loads,
                "batched_rows": sum(len(b.rows) for b in list(self._batches.values()))}

    def health(self) -> dict:
        return {"experts": self.mixture.num_experts, "resident": self.mixture.resident_experts,
                "batched_rows": self.gauges()["batched_rows"]}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- the scheduler thread ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._to_route or self._to_join or self._batches or self._closed):
                    self._wake.wait()
                if self._closed:
                    break
                to_route, self._to_route = self._to_route, []
            if to_route:
                self._route_all(to_route)
            self._join_waiting()
            for expert in list(self._batches):
                self._guarded(expert, self._step)
            if not self._batches:  # only rows whose expert is loading: sleep until a load ends or work comes
                with self._wake:
                    if not (self._to_route or self._closed):
                        self._wake.wait(0.05)
        for batch in self._batches.values():
            for row in batch.rows:
                self._end(row, error="the server is shutting down")

    def _route_all(self, reqs: list[dict]) -> None:
        """Every waiting prompt in one routers call per routing length (a prompt shorter than the prefix is
        routed on the tokens it has)."""
        by_length: dict[int, list[dict]] = {}
        for req in reqs:
            by_length.setdefault(min(self.mixture.prefix, req["route_ids"].shape[1]), []).append(req)
        for length, group in by_length.items():
            start = time.perf_counter()
            try:
                ids = np.stack([req["route_ids"][0, :length].numpy() for req in group])
                chosen, scores = self.mixture.route(ids, length)
            except Exception as exc:  # noqa: BLE001 - answered as a 500 to these requests, the loop goes on
                for req in group:
                    req["routing_error"] = f"routing failed: {exc}"
                    req["routed"].set()
                continue
            seconds = time.perf_counter() - start
            for req, k, s in zip(group, chosen, scores, strict=True):
                req["routing"] = {"expert": int(k), "scores": [float(x) for x in s], "routing_ms": seconds * 1e3}
                self.metrics.routing_sum += seconds
                req["routed"].set()

    def _join_waiting(self) -> None:
        """Routed rows join their expert's batch while it has room; the rest wait for the next step. A row
        whose expert is not in memory waits while the loader thread loads it (decode steps go on), and at
        most max_resident experts run or load at once, so --max-resident-experts bounds memory."""
        self._finish_loads()
        with self._wake:
            waiting, self._to_join = self._to_join, []
        by_expert: dict[int, list[_Row]] = {}
        for row in waiting:
            if row.req["cancel"].is_set():
                self._end(row, "cancelled")
                continue
            if row.expert not in self._batches and row.expert not in by_expert and \
                    not self._can_start(row.expert, set(by_expert)):
                with self._wake:
                    self._to_join.append(row)
                continue
            room = self.max_batch - len(self._batches[row.expert].rows) if row.expert in self._batches else \
                self.max_batch
            joining = by_expert.setdefault(row.expert, [])
            if len(joining) < room:
                joining.append(row)
            else:
                with self._wake:
                    self._to_join.append(row)
        for expert, rows in by_expert.items():
            if rows:
                self._guarded(expert, lambda k, rows=rows: self._prefill(k, rows), rows)

    def _can_start(self, expert: int, starting: set[int]) -> bool:
        """Whether a batch of `expert` may start now (`starting`: experts whose batch starts this turn); if
        its weights are not in memory, start loading them when a slot is free (False until they are).
        Only this thread evicts: room is made here, and the loader thread only loads."""
        if self.fixed_expert is not None:
            return True
        busy = set(self._batches) | set(self._loading) | starting
        free = self.max_active is None or len(busy) < self.max_active
        if expert in self._loading or not free:
            return False
        if self.mixture.is_resident(expert):
            return True
        self.mixture.evict(keep=busy, room=1)
        everyone = range(self.mixture.num_experts)  # the loader evicts nothing
        self._loading[expert] = future = self._loader.submit(self.mixture.expert, expert, everyone)
        future.add_done_callback(lambda _: self._notify())
        return False

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _finish_loads(self) -> None:
        """Forget finished loads; the rows of an expert that failed to load end with a 500."""
        for expert, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[expert]
            if future.exception() is not None:
                with self._wake:
                    failed = [row for row in self._to_join if row.expert == expert]
                    self._to_join = [row for row in self._to_join if row.expert != expert]
                for row in failed:
                    self._end(row, error=f"loading expert {expert} failed: {future.exception()}")

    def _guarded(self, expert: int, work, rows: list[_Row] | None = None) -> None:
        """A failing forward ends its rows with a 500, never the loop."""
        try:
            work(expert)
        except Exception as exc:  # noqa: BLE001
            failed = (rows or []) + (self._batches.pop(expert).rows if expert in self._batches else [])
            for row in failed:
                self._end(row, error=f"generation failed: {type(exc).__name__}: {exc}")

    def _prefill(self, expert: int, rows: list[_Row]) -> None:
        model = self.mixture.expert(expert, busy=set(self._batches))  # resident by now: no load on this thread
        device = self.mixture.device
        lengths = [row.req["ids"].shape[1] for row in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - lengths[i]:] = row.req["ids"][0]
            mask[i, width - lengths[i]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, cache_kw = DynamicCache(), _cache_argument(model)
        echo = any(row.req.get("echo") for row in rows)  # then every position's logits, for the prompts'
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    **{cache_kw: cache}, use_cache=True, logits_to_keep=0 if echo else 1)
        for i, row in enumerate(rows):
            if row.req.get("echo"):
                row.req["prompt_logprobs"] = prompt_entries(out.logits[i, width - lengths[i]:width - 1].cpu(),
                                                            row.req["ids"][0].tolist(), row.req["logprobs"] or 0)
            if row.req["max_tokens"] == 0:  # echo only: scored, nothing to generate
                self._end(row, "length")
        keep = [i for i, row in enumerate(rows) if row.req["max_tokens"] > 0]
        if not keep:
            return
        index = torch.tensor(keep, device=device)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        rows = [rows[i] for i in keep]
        new = _Batch(model, rows, cache, mask.to(device)[index], torch.tensor(lengths, device=device)[index],
                     torch.zeros(len(rows), dtype=torch.long, device=device), cache_kw)
        self._merge(expert, new)
        self._emit(expert, out.logits[index, -1], first=len(self._batches[expert].rows) - len(rows))

    def _merge(self, expert: int, new: _Batch) -> None:
        """Append `new`'s rows to the expert's batch: both caches left-padded to the longer one."""
        old = self._batches.get(expert)
        if old is None:
            self._batches[expert] = new
            return
        width = max(old.mask.shape[1], new.mask.shape[1])
        for a, b in zip(old.cache.layers, new.cache.layers, strict=True):
            a.keys = torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)])
            a.values = torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)])
        old.mask = torch.cat([_left_pad(old.mask, width, 1), _left_pad(new.mask, width, 1)])
        old.positions = torch.cat([old.positions, new.positions])
        old.last = torch.cat([old.last, new.last])
        old.rows += new.rows

    def _step(self, expert: int) -> None:
        """One decode step for every row of the expert's batch."""
        batch = self._batches[expert]
        self.peak_rows = max(self.peak_rows, len(batch.rows))
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        out = batch.model(input_ids=batch.last[:, None], attention_mask=batch.mask,
                          position_ids=batch.positions[:, None], **{batch.cache_kw: batch.cache},
                          use_cache=True)
        batch.positions = batch.positions + 1
        self._emit(expert, out.logits[:, -1], first=0)

    def _emit(self, expert: int, logits: torch.Tensor, first: int) -> None:
        """Sample the next token of rows first.. of the batch, stream it, and drop the rows that ended."""
        batch = self._batches[expert]
        rows = batch.rows[first:]
        logits = logits.cpu()
        tokens = sample_tokens(logits, rows)
        batch.last[first:] = torch.tensor(tokens, device=batch.last.device)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.tokens.append(token)
            if row.req.get("logprobs") is not None:
                row.req.setdefault("token_logprobs", []).extend(
                    token_entries(logits[i:i + 1], [token], row.req["logprobs"]))
            if row.stops is not None or row.on_text is not None:  # else decoded once at the end
                piece = (row.stops or row.decoder).push(token)
                if piece and row.on_text is not None:
                    row.on_text(piece)
            if token == self.eos or (row.stops is not None and row.stops.stopped):
                row.finish = "stop"
            elif len(row.tokens) >= row.req["max_tokens"]:
                row.finish = "length"
            if row.finish is not None and row.on_text is not None and \
                    (rest := row.stops.finish() if row.stops else row.decoder.flush()):
                row.on_text(rest)
        for row in batch.rows:
            if row.finish is None and row.req["cancel"].is_set():
                row.finish = "cancelled"
        self._drop_finished(expert)

    def _drop_finished(self, expert: int) -> None:
        batch = self._batches[expert]
        keep = [i for i, row in enumerate(batch.rows) if row.finish is None]
        for row in batch.rows:
            if row.finish is not None:
                self._end(row, row.finish)
        if not keep:
            del self._batches[expert]
            return
        if len(keep) == len(batch.rows):
            return
        index = torch.tensor(keep, device=batch.mask.device)
        start = int(batch.mask[index].any(dim=0).nonzero()[0])  # columns that are padding in every row left
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        batch.mask, batch.positions, batch.last = batch.mask[index, start:], batch.positions[index], batch.last[index]
        batch.rows = [batch.rows[i] for i in keep]

    @staticmethod
    def _end(row: _Row, finish: str | None = None, error: str | None = None) -> None:
        row.finish, row.error = finish or row.finish, error
        row.done.set()
