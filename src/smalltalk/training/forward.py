"""The training forward pass of our Llama: HF's weights and math in fewer, cheaper kernels.

What HF's general-purpose forward does that training on our models pays for, and what this does instead
(each measured on CPU, benchmarks/speed/bench_vs_nanogpt.py):
- q, k and v are three matmuls and their input gradients three more plus two sums: here one matmul over
  the three weights concatenated (the same FLOPs in fewer, larger calls). Gate and up stay two: fused,
  they measured slower.
- RoPE is five elementwise ops forward and more backward: here one complex multiply, in a basis where
  each rotation pair is adjacent (q and k rows permuted alike, so attention is unchanged).
- RMSNorm is a chain of ops that each read and write the whole activation, its weight one of them: here
  one autograd function with a hand-derived backward (rms_norm.py), and the weight rides on the next
  matmul's weight (`W (w ⊙ n) = (W diag w) n`: a weight-sized multiply instead of an activation-sized one).
- On CPU each half of a layer (norm, q/k/v and RoPE; norm, SwiGLU and the residual) runs as one autograd
  function over cache-sized chunks of rows (training/cpu/sublayers.py): elementwise kernels over DRAM-sized
  activations cost three times what they cost in cache. The residual adds ride on the matmuls.
- Causal attention on CPU, for sequences up to 8 × head dim, is batched matmuls over blocks of query rows
  with the probabilities kept (training/cpu/attention.py): PyTorch's CPU flash kernel runs at a quarter of the
  matmuls' FLOP/s on these shapes.
- The loss copies the logits to shift them: here the last position is simply not projected, and the
  projection and cross-entropy run in chunks (linear_cross_entropy.py: the full logits never exist).

Everything else (modules, parameter names, checkpoints, generation, scoring) stays HF's
`LlamaForCausalLM`: this is only the function `train()` differentiates, tested to give HF's loss and
gradients. Under `torch.compile` on CPU the compiled graph calls the chunked functions eagerly (they beat
Inductor's code there); elsewhere plain real-valued expressions are traced, for Inductor to fuse.
Which path a job runs (this one only on CPU; HF's forward or Liger-Kernel's on GPUs) is decided once, in
training/paths.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from smalltalk.training.cpu.attention import causal_attention
from smalltalk.training.cpu.rms_norm import normalize
from smalltalk.training.cpu.sublayers import attention_input, mlp_sublayer
from smalltalk.training.linear_cross_entropy import linear_cross_entropy


def pair_order(heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Rows of a [q; k] weight reordered so each head's RoPE pairs (i, i + D/2) sit side by side.

    A dot product q·k does not change when both vectors' coordinates are permuted alike, so attention in
    this basis is attention in HF's; RoPE in it is one complex multiply (Meta's original layout, which
    HF's checkpoint converter permutes the other way).
    """
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(heads)[:, None] * head_dim + within).flatten().to(device)


# Eagerly once per shape and device, not per layer and step (on CUDA it would be a copy each time); a
# compiled graph computes it in the graph instead (Dynamo does not trace through caches).
_cached_pair_order = functools.cache(pair_order)


def _qkv_weight(layer) -> torch.Tensor:
    """[q; k; v] with q and k rows in pair order, carrying the RMSNorm weight before it: one matmul, whose
    gradient flows back to the separate HF parameters."""
    attn = layer.self_attn
    d = attn.head_dim
    qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight])
    qk = qk.index_select(0, (pair_order if torch.compiler.is_compiling() else _cached_pair_order)(
        qk.shape[0] // d, d, qk.device))
    return torch.cat([qk, attn.v_proj.weight]) * layer.input_layernorm.weight


def residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x + y @ weight.T: the add done by the matmul itself (one addmm, no pass over x), except under
    autocast, where the matmul runs in low precision and the residual stream must stay in x's dtype."""
    if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling():
        return x + F.linear(y, weight)
    return torch.addmm(x.flatten(0, -2), y.flatten(0, -2), weight.T).view(x.shape)


def _layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    attn, mlp = layer.self_attn, layer.mlp
    b, t, _ = x.shape
    d = attn.head_dim
    heads, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    q, k, v = attention_input(x, layer.input_layernorm.variance_epsilon, _qkv_weight(layer), heads, kv, cos, sin)
    if kv != heads:  # grouped-query attention: query head h reads kv head h // (heads / kv), as HF's repeat_kv
        k, v = k.repeat_interleave(heads // kv, dim=2), v.repeat_interleave(heads // kv, dim=2)
    y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn.scaling)
    x = residual(x, y.transpose(1, 2).reshape(b, t, heads * d), attn.o_proj.weight)
    # gate and up stay two matmuls: one [gate; up] matmul measured ~10% slower (its halves are strided)
    norm = layer.post_attention_layernorm
    return mlp_sublayer(x, norm.variance_epsilon, mlp.gate_proj.weight * norm.weight, mlp.up_proj.weight * norm.weight,
                        mlp.down_proj.weight)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100: what HF's `model(input_ids, labels=...).loss` is."""
    base = model.model
    x = base.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cos, sin = base.rotary_emb(x, positions)  # [1, T, D], both halves equal
    half = cos.shape[-1] // 2
    cos, sin = cos[0, :, None, :half].float(), sin[0, :, None, :half].float()
    for layer in base.layers:
        x = _layer(layer, x, cos, sin)
    h = normalize(x[:, :-1], base.norm.variance_epsilon).flatten(0, 1)
    return linear_cross_entropy(h, model.lm_head.weight * base.norm.weight, labels[:, 1:].flatten())


def hf_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The `hf` path: HF's forward for the body (SDPA attention), the head and loss in chunks
    (linear_cross_entropy: the [batch, T, vocab] logits never exist). A model without a Llama-style
    `model` body and `lm_head` gets HF's own loss."""
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if body is None or head is None or getattr(head, "bias", None) is not None:
        return model(input_ids=input_ids, labels=labels).loss
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
    return linear_cross_entropy(hidden, head.weight, labels[:, 1:].flatten())


def use_liger(model) -> None:
    """The `liger` path: Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy patched into
    this Llama (its loss then comes from `model(input_ids, labels=...)` without the full logits)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)


class TrainingForward(torch.nn.Module):
    """What `train()` wraps in DDP / torch.compile: the loss of a batch by the path training/paths.py
    chose for the job ("cpu-fused", "hf" or "liger")."""

    def __init__(self, model, path: str) -> None:
        super().__init__()
        self.model, self.path = model, path
        if path == "liger":
            use_liger(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.path == "cpu-fused":
            return causal_lm_loss(self.model, input_ids, labels)
        if self.path == "liger":
            return self.model(input_ids=input_ids, labels=labels).loss
        return hf_loss(self.model, input_ids, labels)
