"""The SwiGLU MLP sublayer on CPU in cache-sized chunks of rows: `x + down(silu(h Wg^T) * (h Wu^T))`.

Eager PyTorch runs SwiGLU as separate kernels (silu, a multiply forward; two multiplies and silu's
backward backward), each over the whole [rows, width] activation: on the cpu-expert-2m batch 17 MB
tensors that live in DRAM, so each elementwise kernel costs three times what it does in cache. Here the
rows go through in chunks of ~2 MB: a chunk's gate and up projections are still in cache when silu and
the multiply read them, and the product when the down projection reads it. Only the projections are kept
for the backward pass (autograd keeps silu's output and the product too), which recomputes the rest per
chunk, again in cache. The residual add rides on the down projection's matmul. On GPUs, and under
autocast or torch.compile, the plain expression runs instead (kernel launches, not DRAM passes, are what
chunking would add there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 1 << 21  # one chunk's gate projection in float32: 2 MB, an L2's worth


class _ChunkedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        rows, width = h.shape[0], gate.shape[0]
        g, u, out = h.new_empty(rows, width), h.new_empty(rows, width), torch.empty_like(x)
        step = _chunk_rows(width)
        for start in range(0, rows, step):
            r = slice(start, start + step)
            torch.mm(h[r], gate.T, out=g[r])
            torch.mm(h[r], up.T, out=u[r])
            torch.addmm(x[r], F.silu(g[r]).mul_(u[r]), down.T, out=out[r])
        ctx.save_for_backward(h, g, u, gate, up, down)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, g, u, gate, up, down = ctx.saved_tensors
        grad_h = torch.empty_like(h)
        grad_gate, grad_up, grad_down = torch.zeros_like(gate), torch.zeros_like(up), torch.zeros_like(down)
        step = _chunk_rows(gate.shape[0])
        for start in range(0, h.shape[0], step):
            r = slice(start, start + step)
            act = F.silu(g[r])
            grad_down.addmm_(grad[r].T, act * u[r])
            grad_prod = grad[r] @ down
            grad_u = grad_prod * act
            grad_g = torch.ops.aten.silu_backward(grad_prod.mul_(u[r]), g[r])
            torch.mm(grad_g, gate, out=grad_h[r])
            grad_h[r].addmm_(grad_u, up)
            grad_gate.addmm_(grad_g.T, h[r])
            grad_up.addmm_(grad_u.T, h[r])
        return grad, grad_h, grad_gate, grad_up, grad_down


def _chunk_rows(width: int) -> int:
    return max(128, CHUNK_BYTES // (4 * width))


def swiglu_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """x + down(silu(h gate^T) * (h up^T)) for x, h [..., d]: chunked on CPU in float32 (same values and
    gradients as the plain expression, tested), the plain expression elsewhere."""
    if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or h.dtype != torch.float32):
        return x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
    return _ChunkedSwiGLU.apply(x.flatten(0, -2), h.flatten(0, -2), gate, up, down).view(x.shape)
