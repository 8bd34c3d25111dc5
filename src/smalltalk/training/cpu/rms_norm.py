"""RMSNorm without its weight, x / rms(x), as one autograd function with a hand-derived backward.

HF's RMSNorm is a chain of ops that each read and write the whole activation, its weight one of them; the
training forward folds the weight into the next matmul's weight (`W (w ⊙ n) = (W diag w) n`) and computes
the rest here: a reduction and a multiply forward, a dot product and two multiplies backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x²) + eps) over the last dimension, kept: one reduction kernel (x·x would be a multiply
    and a sum) and three on the [rows, 1] result."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).div_(x.shape[-1] ** 0.5).square_().add_(eps).rsqrt_()


class _Normalize(torch.autograd.Function):
    """RMSNorm without its weight (x / rms(x), statistics in float32 as HF's), with a hand-derived
    backward: a reduction and a multiply forward, a dot product and two multiplies backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        with torch.autocast(x.device.type, enabled=False):
            rstd = inverse_rms(xf, eps)
        ctx.save_for_backward(x, rstd)
        return (xf * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, rstd = ctx.saved_tensors
        xf, g = x.float(), grad.float()
        with torch.autocast(grad.device.type, enabled=False):
            return normalize_backward(g, xf, rstd).to(x.dtype), None


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x): an RMSNorm whose weight the next matmul carries (`W (w ⊙ n) = (W diag w) n`, so the
    weight costs a weight-sized multiply instead of an activation-sized one, forward and backward)."""
    if torch.compiler.is_compiling():
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return _Normalize.apply(x, eps)


def normalize_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The gradient for x of x * rstd (rstd = inverse_rms(x)): rstd·grad − x·rstd³·mean(grad·x); a dot
    product and two multiplies. Used by `normalize` and by the chunked sublayers alike."""
    coef = torch.linalg.vecdot(grad, x).unsqueeze_(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
    return torch.mul(grad, rstd).addcmul_(x, coef)
