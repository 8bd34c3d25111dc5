"""The configuration of a SmallTalk LM mixture in the Hugging Face layout (`smalltalk export`).

This file is copied into every exported directory and loaded there with `trust_remote_code=True`: it imports
transformers only. The expert's attributes (vocabulary, layers, heads, ...) are repeated at the top level, so
that generation utilities that read a text config see the model that produces the logits.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig

_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings")


class SmallTalkConfig(PretrainedConfig):
    """E router LMs + E expert LMs (Llama); a row goes to the expert(s) whose router gives its first
    `routing_prefix` tokens the highest log-likelihood (routing_top_k > 1: c-BTM's mix of the top k, weights
    softmax(score / routing_temperature))."""

    model_type = "smalltalk_mixture"

    def __init__(self, num_experts: int = 2, routing_prefix: int = 64, routing_dtype: str = "float32",
                 routing_top_k: int = 1, routing_temperature: float = 1.0, expert_config: dict | None = None,
                 router_config: dict | None = None, router_method: str = "em", **kwargs) -> None:
        self.num_experts, self.routing_prefix, self.routing_dtype = num_experts, routing_prefix, routing_dtype
        self.routing_top_k, self.routing_temperature = routing_top_k, routing_temperature
        self.router_method = router_method
        self.expert_config = expert_config or LlamaConfig().to_dict()
        self.router_config = router_config or LlamaConfig().to_dict()
        for key in _TEXT_KEYS:
            kwargs.setdefault(key, self.expert_config.get(key))
        kwargs.setdefault("tie_word_embeddings", False)  # each expert ties its own; the mixture has no embedding
        super().__init__(**kwargs)
        for key in _TEXT_KEYS:
            setattr(self, key, kwargs[key])
