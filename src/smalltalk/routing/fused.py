"""A lean inference-only forward of an HF Llama body, for router scoring.

Tiny routers (d = 32-96) spend most of their time outside matmuls in the HF forward: mask and cache
objects, rotary tables rebuilt per call, three separate q/k/v and two gate/up matmuls, unfused norms.
This body computes the same function with q/k/v and gate/up fused into one matmul each, cached rotary
tables, `F.rms_norm` and causal SDPA, on the model's own weights (views: no copies that could go stale,
except the two concatenated projections, rebuilt by `FusedLlamaBody(model)`). It returns the final-norm
hidden states, exactly what `model.model(...).last_hidden_state` gives (to float rounding; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """True for the plain Llama configurations this body reproduces (ours: no biases, SiLU, default RoPE)."""
    cfg = model.config
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    return (cfg.model_type == "llama" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and cfg.hidden_act == "silu" and rope_type == "default")


class FusedLlamaBody(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        body, cfg = model.model, model.config
        self.embed = body.embed_tokens
        self.rotary = body.rotary_emb
        self.final_norm = body.norm
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "in_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                "qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                "o": attn.o_proj.weight, "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                "down": mlp.down_proj.weight, "scaling": attn.scaling,
            })
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _rope_tables(self, x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] < length or self._rope[1].device != x.device:
            positions = torch.arange(length, device=x.device)[None]
            cos, sin = self.rotary(x, positions)
            self._rope = (length, cos[0], sin[0])
        return self._rope[1][:length, None], self._rope[2][:length, None]  # [S, 1, head_dim]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        x = self.embed(input_ids)
        cos, sin = self._rope_tables(x, length)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for w in self.layers:
            h = F.rms_norm(x, (x.shape[-1],), w["in_norm"], self.eps)
            qk, v = (h @ w["qkv"].T).split([q_size + kv_size, kv_size], dim=-1)
            qk = self._rotate(qk.view(batch, length, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk.transpose(1, 2).split([self.heads, self.kv_heads], dim=1)  # one RoPE pass for q and k
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=w["scaling"])
            x = x + a.transpose(1, 2).reshape(batch, length, q_size) @ w["o"].T
            h = F.rms_norm(x, (x.shape[-1],), w["post_norm"], self.eps)
            gate, up = (h @ w["gate_up"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w["down"].T
        return self.final_norm(x)
