"""The training forward pass of our Llama: HF's weights and math in fewer kernels.

Training spends its time where HF's general-purpose forward is generic. q/k/v and gate/up run as five
matmuls: here as one [q; k; v] and one [gate; up] matmul over the same parameters concatenated (the same
FLOPs in fewer, larger calls, and fewer gradient sums in backward). RoPE runs as five elementwise ops
forward and more backward: here as one complex multiply, in a basis where each rotation pair is adjacent
(q and k rows permuted alike: attention is unchanged). RMSNorm and SwiGLU are chains of ops that each
read and write the whole activation: here each is one autograd function with a hand-derived backward
that writes its gradient where it belongs instead of concatenating. The loss skips HF's shifted copy of
the logits (the last position is simply not projected).

Everything else (modules, parameter names, checkpoints, generation, scoring) stays HF's
`LlamaForCausalLM`: this is only the function `train()` differentiates, tested to give HF's loss and
gradients. Under `torch.compile` plain real-valued expressions are traced instead, for Inductor to fuse.
A model this path does not cover (biases, another activation, sliding windows) trains through HF's own
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def pair_order(heads: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Rows of a [q; k] weight reordered so each head's RoPE pairs (i, i + D/2) sit side by side.

    A dot product q·k does not change when both vectors' coordinates are permuted alike, so attention in
    this basis is attention in HF's; RoPE in it is one complex multiply (Meta's original layout, which
    HF's checkpoint converter permutes the other way).
    """
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return (torch.arange(heads)[:, None] * head_dim + within).flatten().to(device)


def rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., T, N, D] in pair order, by `angles` = cos + i·sin [T, 1, D/2] (float32 out, as HF's)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # Inductor fuses real arithmetic; complex tensors it would not
        re, im = pairs.unbind(-1)
        return torch.stack((re * angles.real - im * angles.imag, re * angles.imag + im * angles.real), -1).flatten(-2)
    return torch.view_as_real(torch.view_as_complex(pairs) * angles).flatten(-2)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up on the [gate | up] output of one matmul, whose backward writes both halves' gradients
    into one buffer (autograd would build them apart and concatenate)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate_up, activated)
        return activated * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate_up, activated = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(activated, grad, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_up)


class _RMSNorm(torch.autograd.Function):
    """HF's LlamaRMSNorm (float32 statistics, `weight * normed`) with a hand-derived backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        with torch.autocast(x.device.type, enabled=False):  # vecdot would run in bf16 under autocast
            rstd = torch.rsqrt(torch.linalg.vecdot(xf, xf).unsqueeze(-1).div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf, g = x.float(), grad.float()
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):  # float32 throughout, as the forward
            if ctx.needs_input_grad[0]:
                gw = g * weight.float()
                coef = torch.linalg.vecdot(gw, xf).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
                grad_x = torch.mul(gw, rstd).addcmul_(xf, coef, value=-1).to(x.dtype)
            if ctx.needs_input_grad[1]:
                d = x.shape[-1]
                grad_w = ((g * xf).reshape(-1, d).t() @ rstd.reshape(-1)).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    if torch.compiler.is_compiling():
        xf = x.float()
        return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)
    return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)


def covers(model) -> bool:
    """Whether `model` is a Llama this path computes exactly as HF's forward does."""
    from transformers import LlamaForCausalLM

    c = getattr(model, "config", None)
    return (isinstance(model, LlamaForCausalLM) and not c.attention_bias and not getattr(c, "mlp_bias", False)
            and c.hidden_act == "silu" and not c.attention_dropout and getattr(c, "pretraining_tp", 1) == 1
            and getattr(c, "sliding_window", None) is None)


def _fused_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """[q; k; v] (q and k rows in pair order) and [gate; up]: one matmul each, gradients flow back to the
    separate HF parameters."""
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    qk = torch.cat([attn.q_proj.weight, attn.k_proj.weight])
    qk = qk.index_select(0, pair_order(qk.shape[0] // d, d, qk.device))
    return torch.cat([qk, attn.v_proj.weight]), torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])


def _layer(layer, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    attn, mlp = layer.self_attn, layer.mlp
    b, t, _ = x.shape
    d = attn.head_dim
    heads, kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    qkv_weight, gate_up_weight = _fused_weights(layer)
    qkv = F.linear(rms_norm(x, layer.input_layernorm), qkv_weight).view(b, t, heads + 2 * kv, d)
    q, k, v = qkv.split([heads, kv, kv], dim=2)
    q, k = rotary(q, angles), rotary(k, angles)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=attn.scaling, enable_gqa=kv != heads)
    x = x + attn.o_proj(y.transpose(1, 2).reshape(b, t, heads * d))
    gate_up = F.linear(rms_norm(x, layer.post_attention_layernorm), gate_up_weight)
    return x + mlp.down_proj(swiglu(gate_up))


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100: what HF's `model(input_ids, labels=...).loss` is."""
    base = model.model
    x = base.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cos, sin = base.rotary_emb(x, positions)  # [1, T, D], both halves equal
    half = cos.shape[-1] // 2
    angles = torch.complex(cos[0, :, None, :half].float(), sin[0, :, None, :half].float())
    for layer in base.layers:
        x = _layer(layer, x, angles)
    logits = model.lm_head(rms_norm(x[:, :-1], base.norm))
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class TrainingForward(torch.nn.Module):
    """What `train()` wraps in DDP / torch.compile: the loss of a batch, by the fast path when it covers
    the model, else by HF's forward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.fast = covers(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return causal_lm_loss(self.model, input_ids, labels)
        return self.model(input_ids=input_ids, labels=labels).loss
