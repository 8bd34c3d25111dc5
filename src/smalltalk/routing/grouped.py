"""E routers of one shape scored as one grouped forward: stacked weights and batched matmuls.

A loop over E Hugging Face models launches E x (ops per forward) kernels. For a served prompt (batch 1)
and on a GPU that launch cost, not the FLOPs, sets the time: four routers took 1.9x the wall time of the
expert's forward on the demo mixture, and the paper's 4.4M routers reach 2.7% of an H200's bf16 peak
(docs/scaling.md). Here every op runs once for all E routers: `torch.bmm` over [E, rows, d] x [E, d, d']
and one SDPA call over the E x B sequences. The arithmetic is HF Llama's (RMSNorm in fp32, RoPE, SwiGLU,
causal SDPA with scale 1/sqrt(head_dim)), so scores equal the per-router loop's to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smalltalk.training.linear_cross_entropy import chunked_logprobs


def groupable(models: list) -> bool:
    """True when every model is an HF Llama with one and the same shape (stackable weights)."""
    from transformers import LlamaForCausalLM

    if not models or not all(isinstance(m, LlamaForCausalLM) for m in models):
        return False
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rms_norm_eps", "hidden_act")
    first = models[0].config
    return all(all(getattr(m.config, k) == getattr(first, k) for k in keys) for m in models) and \
        first.hidden_act == "silu"


class GroupedRouters:
    """Stacked copies of E routers' weights on `device`; `prefix_loglik(ids)` -> [B, E] float32."""

    def __init__(self, models: list, device: torch.device | str = "cpu") -> None:
        if not groupable(models):
            raise ValueError("grouped scoring needs HF Llama routers of one shape")
        config = models[0].config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        rotary = models[0].model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.detach().float().to(device), rotary.attention_scaling

        def stack(get) -> torch.Tensor:
            return torch.stack([get(m).detach() for m in models]).to(device)

        self.embed = stack(lambda m: m.model.embed_tokens.weight)  # [E, V, d]
        self.head = stack(lambda m: m.lm_head.weight)  # [E, V, d]
        self.final_norm = stack(lambda m: m.model.norm.weight)
        self.layers = []
        for i in range(config.num_hidden_layers):
            def of(m, i=i):
                return m.model.layers[i]
            self.layers.append({
                "norm_in": stack(lambda m: of(m).input_layernorm.weight),
                "qkv": stack(lambda m: torch.cat([of(m).self_attn.q_proj.weight, of(m).self_attn.k_proj.weight,
                                                  of(m).self_attn.v_proj.weight]).T),  # [E, d, (H + 2K) hd]
                "o": stack(lambda m: of(m).self_attn.o_proj.weight.T),
                "norm_post": stack(lambda m: of(m).post_attention_layernorm.weight),
                "gate_up": stack(lambda m: torch.cat([of(m).mlp.gate_proj.weight, of(m).mlp.up_proj.weight]).T),
                "down": stack(lambda m: of(m).mlp.down_proj.weight.T)})
        self.num_experts = len(models)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight[:, None, :] * x.to(dtype)

    def _rope(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def _attention(self, h: torch.Tensor, layer: dict, batch: int, length: int, rope) -> torch.Tensor:
        experts, hd = self.num_experts, self.head_dim
        qkv = torch.bmm(h, layer["qkv"].to(h.dtype))
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # [E, B*S, n*hd] -> [E*B, n, S, hd]
            return t.reshape(experts * batch, length, n, hd).transpose(1, 2)

        q, k, v = heads(q, self.heads), heads(k, self.kv_heads), heads(v, self.kv_heads)
        q, k = self._rotate(q, *rope), self._rotate(k, *rope)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.bmm(out.transpose(1, 2).reshape(experts, batch * length, -1), layer["o"].to(h.dtype))

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [E, B*S, d] of every router on every row of `input_ids` [B, S]."""
        batch, length = input_ids.shape
        x = self.embed[:, input_ids.reshape(-1)]  # [E, B*S, d]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        rope = self._rope(length, x.device, dtype)
        for layer in self.layers:
            x = x + self._attention(self._rms(x, layer["norm_in"]), layer, batch, length, rope)
            gate, up = torch.bmm(self._rms(x, layer["norm_post"]), layer["gate_up"].to(dtype)).chunk(2, dim=-1)
            x = x + torch.bmm(F.silu(gate) * up, layer["down"].to(dtype))
        return self._rms(x, self.final_norm)

    @torch.inference_mode()
    def prefix_loglik(self, input_ids: torch.Tensor, block_logits: int = 1 << 27) -> torch.Tensor:
        """[B, E] float32: summed log-likelihood of tokens 2..M of each row under each router; the LM
        head runs on blocks of at most `block_logits` logits (E x rows x V) so the logits never all exist."""
        batch, length = input_ids.shape
        hidden = self.hidden(input_ids).view(self.num_experts, batch, length, -1)[:, :, :-1]
        hidden = hidden.reshape(self.num_experts, batch * (length - 1), -1)
        targets = input_ids[:, 1:].reshape(-1)
        head = self.head.to(hidden.dtype).transpose(1, 2)
        block_rows = max(16, block_logits // (self.num_experts * head.shape[-1]))
        out = chunked_logprobs(hidden, head, targets, block_rows)  # [E, rows]
        return out.view(self.num_experts, batch, length - 1).sum(dim=2).T
