"""A Llama layer's two halves on CPU in cache-sized chunks of rows, each as one autograd function.

Eager PyTorch runs a sublayer as separate kernels (RMSNorm's reduction and multiply, RoPE's multiplies,
silu and the SwiGLU product; more of them backward), each over the whole activation: on the cpu-expert-2m
batch 6-19 MB tensors that live in DRAM, so an elementwise kernel costs about three times what it costs
in cache. Here the rows go through in chunks of ~2 MB, each normalised, projected and rotated (or gated
and projected back) while it is in cache, and only what the backward pass cannot cheaply recompute is
kept: x and its inverse RMS, the gate and up projections (autograd would also keep the normalised input,
silu's output and the product). The backward pass recomputes the rest per chunk, again in cache.

- attention_input: q, k, v of `normalize(x) @ [Wq; Wk; Wv]^T`, q and k rotated (RoPE, pair order).
- mlp_sublayer: `x + down(silu(n Wg^T) * (n Wu^T))`, n = normalize(x), the residual add in the matmul.

RMSNorm weights are folded into the next weights by the caller. On GPUs, under autocast and for other
dtypes the plain expressions run (there chunks would only add kernel launches); both paths
give the same values and gradients (tests/test_forward.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from smalltalk.training.cpu.rms_norm import inverse_rms, normalize, normalize_backward

CHUNK_BYTES = 1 << 21  # a chunk's widest activation in float32: 2 MB, an L2's worth


def chunked(x: torch.Tensor) -> bool:
    """Whether x takes the chunked path: float32 on CPU, no autocast. Under torch.compile too, called
    eagerly from the compiled graph (`eager`): on CPU they beat what Inductor makes of the plain
    expressions (cpu-expert-7m: compiled 2,164 tokens/s against 2,457 eager, bench_vs_nanogpt.py)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def eager(function):
    """`function` run eagerly when a torch.compile'd graph calls it (a graph break there)."""
    return torch.compiler.disable(function)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., T, N, D] in pair order, by angles of cosine `cos` and sine `sin` [T, 1, D/2]
    (float32 out, as HF's)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # Inductor fuses real arithmetic; complex tensors it cannot
        re, im = pairs.unbind(-1)
        return torch.stack((re * cos - im * sin, re * sin + im * cos), -1).flatten(-2)
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as D/2 complex numbers (a view; a copy only if the last dimension is strided)."""
    return torch.view_as_complex((x if x.stride(-1) == 1 else x.contiguous()).unflatten(-1, (-1, 2)))


def attention_input(x: torch.Tensor, eps: float, weight: torch.Tensor, heads: int, kv: int, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, T, heads, D], k and v [B, T, kv, D] of `normalize(x) @ weight.T` for x [B, T, d], weight the
    [q; k; v] rows with q and k in pair order; q and k rotated by `cos`, `sin` [T, 1, D/2]."""
    if not chunked(x):
        b, t, _ = x.shape
        qkv = F.linear(normalize(x, eps), weight).view(b, t, heads + 2 * kv, -1)
        q, k, v = qkv.split([heads, kv, kv], dim=2)
        return rotary(q, cos, sin), rotary(k, cos, sin), v
    return _attention_input(x, eps, weight, heads, kv, cos, sin)


class _AttentionInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, weight: torch.Tensor, heads: int, kv: int,
                turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        # [B, T, N, D] views of [B, N, T, D] memory: attention reads q, k, v per head (training/cpu/attention.py)
        q, k, v = (x.new_empty(b, n, t, weight.shape[0] // (heads + 2 * kv)).transpose(1, 2) for n in (heads, kv, kv))
        rstd = inverse_rms(x, eps)
        for r in _sequence_chunks(b, t, weight.shape[0]):
            qkv = ((x[r] * rstd[r]) @ weight.T).view(*q[r].shape[:2], heads + 2 * kv, -1)
            torch.mul(_pairs(qkv[:, :, :heads]), turns, out=_pairs(q[r]))
            torch.mul(_pairs(qkv[:, :, heads:heads + kv]), turns, out=_pairs(k[r]))
            v[r] = qkv[:, :, heads + kv:]
        ctx.save_for_backward(x, rstd, weight, turns)
        ctx.heads = heads
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        x, rstd, weight, turns = ctx.saved_tensors
        heads, kv = ctx.heads, grad_k.shape[2]
        grad_x, grad_w, back = torch.empty_like(x), torch.zeros_like(weight), turns.conj()
        for r in _sequence_chunks(*x.shape[:2], weight.shape[0]):
            n = (x[r] * rstd[r]).flatten(0, 1)
            grad_qkv = x.new_empty(*grad_q[r].shape[:2], heads + 2 * kv, grad_q.shape[-1])
            torch.mul(_pairs(grad_q[r]), back, out=_pairs(grad_qkv[:, :, :heads]))
            torch.mul(_pairs(grad_k[r]), back, out=_pairs(grad_qkv[:, :, heads:heads + kv]))
            grad_qkv[:, :, heads + kv:] = grad_v[r]
            grad_qkv = grad_qkv.flatten(2).flatten(0, 1)
            grad_w.addmm_(grad_qkv.T, n)
            grad_x[r] = normalize_backward(grad_qkv @ weight, x[r].flatten(0, 1), rstd[r].flatten(0, 1)).view_as(x[r])
        return grad_x, None, grad_w, None, None, None


@eager
def _attention_input(x: torch.Tensor, eps: float, weight: torch.Tensor, heads: int, kv: int, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _AttentionInput.apply(x, eps, weight, heads, kv, torch.complex(cos, sin))  # Inductor has no complex


def _sequence_chunks(batch: int, seq: int, width: int) -> list[slice]:
    """Whole sequences per chunk (RoPE's angles follow positions), ~CHUNK_BYTES of [rows, width]."""
    step = max(1, CHUNK_BYTES // (4 * seq * width))
    return [slice(s, s + step) for s in range(0, batch, step)]


def mlp_sublayer(x: torch.Tensor, eps: float, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor) -> torch.Tensor:
    """x + down(silu(n gate^T) * (n up^T)) with n = normalize(x, eps), for x [..., d]."""
    if not chunked(x):
        n = normalize(x, eps)
        return x + F.linear(F.silu(F.linear(n, gate)) * F.linear(n, up), down)
    return _mlp_sublayer(x.flatten(0, -2), eps, gate, up, down).view(x.shape)


class _MLPSublayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[0], gate.shape[0]
        g, u, out, rstd = x.new_empty(rows, width), x.new_empty(rows, width), torch.empty_like(x), inverse_rms(x, eps)
        for r in _row_chunks(rows, width):
            n = x[r] * rstd[r]
            torch.mm(n, gate.T, out=g[r])
            torch.mm(n, up.T, out=u[r])
            torch.addmm(x[r], F.silu(g[r]).mul_(u[r]), down.T, out=out[r])
        ctx.save_for_backward(x, rstd, g, u, gate, up, down)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, rstd, g, u, gate, up, down = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_gate, grad_up, grad_down = torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
        for r in _row_chunks(*g.shape):
            n, act = x[r] * rstd[r], F.silu(g[r])
            grad_down.addmm_(grad[r].T, act * u[r])
            grad_prod = grad[r] @ down
            grad_u = grad_prod * act
            grad_g = torch.ops.aten.silu_backward(grad_prod.mul_(u[r]), g[r])
            grad_gate.addmm_(grad_g.T, n)
            grad_up.addmm_(grad_u.T, n)
            grad_n = torch.mm(grad_g, gate).addmm_(grad_u, up)
            torch.add(grad[r], normalize_backward(grad_n, x[r], rstd[r]), out=grad_x[r])  # + the residual's
        return grad_x, None, grad_gate, grad_up, grad_down


_mlp_sublayer = eager(_MLPSublayer.apply)


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(128, CHUNK_BYTES // (4 * width))
    return [slice(s, s + step) for s in range(0, rows, step)]
