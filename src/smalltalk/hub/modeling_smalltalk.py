"""A SmallTalk LM mixture as one Hugging Face causal LM (`smalltalk export`; loaded with trust_remote_code=True).

This file is copied into every exported directory and imports torch and transformers only. It is also the
routing rule of our own package: `SmallTalkMixture.route` chooses experts with `choose_experts` below, so the
exported model and the package can never route differently.

Each row is routed by its own first `routing_prefix` real tokens (left or right padding: the attention mask says
which are real): every router scores their log-likelihood (tokens 2..M given their past, uniform prior) and the
row goes to the argmax (lowest index on ties). The routers are E small Llama LMs (the paper's) or, with
router_method "ngram", E count-based n-gram LMs whose tables are buffers of this model (look-ups, no matmul).
With routing_top_k > 1, to its k best experts, mixed with weights
softmax(score / routing_temperature) (c-BTM). Only the chosen experts run, each on its own rows, each with its own KV
cache during generation. `routed_experts` of the output says which expert(s) each row used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_smalltalk import SmallTalkConfig


def choose_experts(scores: torch.Tensor, top_k: int = 1, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Router scores [B, E] -> (experts [B, k], weights [B, k]): the k best by score, ties to the lower index;
    weights softmax(score / temperature) over those k (1 for k = 1)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :top_k]
    weights = torch.softmax(scores.gather(1, order) / temperature, dim=1)
    return order, weights


def routing_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """The first `length` real tokens of each row, left-aligned: (ids [B, L], mask [B, L]), L <= length."""
    mask = attention_mask.bool()
    rank = mask.long().cumsum(dim=1) - 1  # position of each real token among its row's real tokens
    keep = mask & (rank < length)
    width = int(keep.sum(dim=1).max())
    ids = input_ids.new_zeros((input_ids.shape[0], width))
    rows, cols = keep.nonzero(as_tuple=True)
    ids[rows, rank[rows, cols]] = input_ids[rows, cols]
    out_mask = torch.arange(width, device=ids.device)[None, :] < keep.sum(dim=1, keepdim=True)
    return ids, out_mask.long()


def prefix_loglik(router: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] summed log-likelihood of each row's tokens 2..n given their past, n its real tokens (right padded)."""
    logits = router(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(dim=1)


class NgramRouters(nn.Module):
    """E count-based n-gram LMs (smalltalk's routing.method=ngram): log p_e(x_s | c_s) = log (n_e(c_s, x_s) +
    prior p_e(x_s)) / (n_e(c_s) + prior), p_e the add-one unigram, c_s the order - 1 tokens before x_s (id
    vocab_size before the start). Tables index n-grams directly while they fit, else through a multiplicative
    hash of the key, as the package's routing/ngram.py does, in the same float precisions."""

    _HASH = 0x9E3779B97F4A7C15 - (1 << 64)  # Fibonacci hashing's multiplier as int64: products wrap as uint64's

    def __init__(self, num_experts: int, vocab_size: int, order: int, prior: float, pair_size: int,
                 context_size: int) -> None:
        super().__init__()
        self.vocab_size, self.order, self.prior = vocab_size, order, prior
        for name, size in (("pairs", pair_size), ("contexts", context_size), ("unigrams", vocab_size)):
            self.register_buffer(name, torch.zeros(num_experts, size, dtype=torch.float32))

    def _apply(self, fn, recurse: bool = True):
        """Follow the model to its device, never to its dtype: the tables are counts, and a bfloat16 copy would
        round them (a model loaded with dtype=torch.bfloat16 routes as in float32)."""
        for name, table in self._buffers.items():
            device = fn(torch.empty(0, dtype=table.dtype, device=table.device)).device
            self._buffers[name] = torch.empty_like(table, device=device) if table.is_meta else table.to(device)
        return self

    def _fold(self, keys: torch.Tensor, size: int, space: int) -> torch.Tensor:
        if space <= size:
            return keys
        bits = size.bit_length() - 1  # a power of two: the top `bits` bits of the 64-bit product
        return ((keys * self._HASH) >> (64 - bits)) & ((1 << bits) - 1)

    def prefix_loglik(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, E] summed log-likelihood of each row's tokens 2..n (right padded)."""
        vocab, width = self.vocab_size, ids.shape[1] - 1
        padded = torch.cat([ids.new_full((ids.shape[0], self.order - 1), vocab), ids], dim=1).long()
        context = torch.zeros(ids.shape[0], width, dtype=torch.long, device=ids.device)
        for j in range(self.order - 1):
            context = context * (vocab + 1) + padded[:, 1 + j:1 + j + width]
        targets = ids[:, 1:].long()
        space = (vocab + 1) ** (self.order - 1)
        pair = self._fold(context * vocab + targets, self.pairs.shape[1], space * vocab)
        context = self._fold(context, self.contexts.shape[1], space)
        total = self.unigrams.double().sum(dim=1) + vocab  # [E]; the tables are float32 (_apply keeps them)
        p_unigram = (self.unigrams[:, targets] + 1.0).double() / total[:, None, None]  # [E, B, S]
        p = (self.pairs[:, pair].double() + self.prior * p_unigram) / (self.contexts[:, context] + self.prior).double()
        return (p.log() * mask[:, 1:].double()).sum(dim=-1).T.float()


@dataclass
class MixtureState:
    """What generation carries from step to step: each row's experts and weights, each expert's rows and KV
    cache, and how many tokens the caches hold."""

    experts: torch.Tensor
    weights: torch.Tensor
    groups: list  # (expert, its rows, the slot of each row's k that it fills), fixed for the whole generation
    caches: dict
    length: int


@dataclass
class SmallTalkCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    routed_experts: torch.LongTensor | None = None  # [B, k]: the expert(s) each row went to
    routing_weights: torch.FloatTensor | None = None  # [B, k]
    router_scores: torch.FloatTensor | None = None  # [B, E] prefix log-likelihoods (None on cached steps)
    mixture_state: MixtureState | None = None


def _cache_keyword() -> str:
    """Llama's KV-cache argument: `cache` (transformers >= 5.2x) or `past_key_values` (earlier)."""
    import inspect

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class SmallTalkForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SmallTalkConfig
    base_model_prefix = "smalltalk"
    _no_split_modules = ["LlamaDecoderLayer"]
    main_input_name = "input_ids"

    def __init__(self, config: SmallTalkConfig) -> None:
        super().__init__(config)
        if config.router_method == "ngram":
            self.routers = NgramRouters(config.num_experts, **config.router_config)
        else:
            self.routers = nn.ModuleList(LlamaForCausalLM(LlamaConfig(**config.router_config))
                                         for _ in range(config.num_experts))
        self.experts = nn.ModuleList(LlamaForCausalLM(LlamaConfig(**config.expert_config))
                                     for _ in range(config.num_experts))
        self._cache_keyword = _cache_keyword()
        self.post_init()
        tied = getattr(self, "all_tied_weights_keys", None)  # transformers 5: the tied pairs of every submodel
        for name, model in self._llamas():
            for key, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
                tied[f"{name}.{key}"] = f"{name}.{source}"

    def _llamas(self) -> list[tuple[str, nn.Module]]:
        """(state-dict prefix, model) of every Llama inside: the experts and the router LMs, if any."""
        routers = list(self.routers) if isinstance(self.routers, nn.ModuleList) else []
        return [*((f"routers.{i}", m) for i, m in enumerate(routers)),
                *((f"experts.{i}", m) for i, m in enumerate(self.experts))]

    def tie_weights(self, *args, **kwargs):
        """Each router and expert ties its LM head to its embedding when its own config says so (they sit in
        ModuleLists, where the default tying does not look)."""
        super().tie_weights(*args, **kwargs)
        for _, model in self._llamas():
            model.tie_weights()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # one KV cache per expert, carried in `mixture_state`

    def get_input_embeddings(self) -> nn.Module:
        return self.experts[0].get_input_embeddings()

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(experts [B, k], weights [B, k], scores [B, E]) of each row, from its first routing_prefix real tokens."""
        ids, mask = routing_prefix(input_ids, attention_mask, self.config.routing_prefix)
        if ids.shape[1] < 2 or bool((mask.sum(dim=1) < 2).any()):
            raise ValueError("every row needs at least 2 real tokens to be routed (the routers score tokens 2..M)")
        if isinstance(self.routers, NgramRouters):
            scores = self.routers.prefix_loglik(ids, mask)
        else:
            bf16 = self.config.routing_dtype == "bfloat16"
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
                scores = torch.stack([prefix_loglik(r, ids, mask) for r in self.routers], dim=1)
        experts, weights = choose_experts(scores, self.config.routing_top_k, self.config.routing_temperature)
        return experts.to(ids.device), weights.to(ids.device), scores

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, mixture_state: MixtureState | None = None,
                use_cache: bool | None = None, **kwargs) -> SmallTalkCausalLMOutput:
        """Logits of each row under its routed expert(s) (routing_top_k > 1: the log of their weighted mixture); loss
        against `labels` (shifted inside, -100 ignored) as any HF causal LM."""
        past = mixture_state.length if mixture_state is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        scores = None
        if mixture_state is None:
            experts, weights, scores = self.route(input_ids, attention_mask)
            groups = [(e, *(experts == e).nonzero(as_tuple=True)) for e in torch.unique(experts).tolist()]
        else:
            experts, weights, groups = mixture_state.experts, mixture_state.weights, mixture_state.groups
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        single, whole = experts.shape[1] == 1, len(groups) == 1 and experts.shape[1] == 1
        logits, caches = None, {}
        for e, rows, slot in groups:
            extra = {self._cache_keyword: mixture_state.caches[e]} if mixture_state is not None else {}
            def take(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:  # one expert for all rows: no gather
                return t if whole else t[rows]

            out = self.experts[e](input_ids=take(input_ids), attention_mask=take(attention_mask),
                                  position_ids=take(positions), use_cache=bool(use_cache), **extra)
            if use_cache:
                caches[e] = getattr(out, self._cache_keyword, None) or getattr(out, "past_key_values", None)
            if whole:
                logits = out.logits
                break
            part = out.logits.float()
            if not single:  # log of the weighted mixture of the k experts' probabilities
                part = torch.log_softmax(part, dim=-1) + weights[rows, slot].float().log()[:, None, None]
            if logits is None:
                fill = float("-inf") if not single else 0.0
                logits = part.new_full((input_ids.shape[0], experts.shape[1], *part.shape[1:]), fill)
            logits[rows, slot] = part
        if not whole:
            logits = logits[:, 0] if single else torch.logsumexp(logits, dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        state = MixtureState(experts, weights, groups, caches, past + input_ids.shape[1]) if use_cache else None
        return SmallTalkCausalLMOutput(loss=loss, logits=logits, routed_experts=experts, routing_weights=weights,
                                       router_scores=scores, mixture_state=state)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      mixture_state: MixtureState | None = None, use_cache: bool | None = True,
                                      **kwargs) -> dict:
        if mixture_state is not None:  # the caches hold the first `length` tokens: feed only the new ones
            input_ids = input_ids[:, mixture_state.length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mixture_state": mixture_state,
                "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False,
                                            num_new_tokens: int = 1) -> dict:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        model_kwargs["mixture_state"] = outputs.mixture_state
        return model_kwargs


SmallTalkConfig.register_for_auto_class()
SmallTalkForCausalLM.register_for_auto_class("AutoModelForCausalLM")
