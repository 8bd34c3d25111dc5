"""Causal self-attention on CPU for short sequences: batched matmuls over blocks of query rows.

PyTorch's CPU flash-attention kernel (what `F.scaled_dot_product_attention` runs in float32) reaches ~30
GFLOP/s on our training shapes (head dim 32, 256 tokens), a quarter of what the same cores' matmuls do:
its inner products are small, one query block and one head at a time. Here attention is the textbook
softmax(q k^T) v as batched matmuls over a few sequences' heads at once, in chunks whose scores fit in
cache. Causality is exploited per block of query rows: block i attends to keys [0, end of block i) only,
so with 64-row blocks 62.5% of a 256-token score matrix is computed (flash's share too), masked on the
diagonal block. The probabilities are kept for the backward pass instead of being recomputed from the
log-sum-exp as flash does: one matmul of six fewer, for B·H·T·(T/2 + 32) floats a layer, (T/2 + 32) /
(3 × head dim) times the layer's q, k and v. Hence this path only while T <= 8 × head dim (at head dim
32, 1.7× q, k and v; at cpu-expert-7m +44% of a layer's kept activations, 335 MB for the 32 × 256
batch); longer sequences, GPUs and autocast run PyTorch's kernel (a compiled graph calls this one eagerly).
Measured by benchmarks/speed/bench_attention.py (alternating pairs, medians): forward + backward 1.29× and
1.42× faster than that kernel at the cpu-expert-2m and 7m shapes, a training step 1.067× and 1.035×.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from smalltalk.training.cpu import sublayers as chunked_sublayers

QUERY_BLOCK = 64  # query rows per block: flash's own split at these lengths


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T · scale, causal) v for q, k, v [B, H, T, D] (any strides); the result is [B, H, T, D]
    laid out as [B, T, H, D] in memory, as PyTorch's kernel returns it, so that the output projection's
    input is a view."""
    t, d = q.shape[-2:]
    if not (chunked_sublayers.chunked(q) and t <= 8 * d and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return _block_causal_attention(q, k, v, scale)


def _query_blocks(t: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + QUERY_BLOCK, t)) for lo in range(0, t, QUERY_BLOCK)]


def _sequence_chunks(batch: int, heads: int, t: int) -> list[slice]:
    """Whole sequences per chunk, so that one block's scores [chunk·H, 64, T] take ~CHUNK_BYTES."""
    step = max(1, chunked_sublayers.CHUNK_BYTES // (4 * heads * min(QUERY_BLOCK, t) * t))
    return [slice(s, s + step) for s in range(0, batch, step)]


class _BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, t, d = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = q.new_empty(b, t, h, d)
        future = torch.full((t, t), float("-inf"), dtype=q.dtype).triu_(1)  # added to the scores: masks them
        probs = []  # per chunk of sequences, per block of query rows
        for r in _sequence_chunks(b, h, t):
            qc, kc, vc = (z[r].flatten(0, 1) for z in (q, k, v))  # [chunk·H, T, D]
            probs.append([])
            for lo, hi in _query_blocks(t):
                p = torch.softmax(torch.baddbmm(future[lo:hi, :hi], qc[:, lo:hi], kc[:, :hi].transpose(1, 2),
                                                alpha=scale), dim=-1)
                out[r, lo:hi] = torch.bmm(p, vc[:, :hi]).unflatten(0, (-1, h)).transpose(1, 2)
                probs[-1].append(p)
        ctx.save_for_backward(q, k, v)
        ctx.probs, ctx.scale = probs, scale
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v = ctx.saved_tensors
        b, h, t, d = q.shape
        probs, ctx.probs = ctx.probs, None
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for r, chunk_probs in zip(_sequence_chunks(b, h, t), probs, strict=True):
            qc, kc, vc, gq, gk, gv = (z[r].flatten(0, 1) for z in (q, k, v, grad_q, grad_k, grad_v))
            g = grad[r].contiguous().flatten(0, 1)
            blocks = list(zip(_query_blocks(t), chunk_probs, strict=True))
            for (lo, hi), p in reversed(blocks):  # the last block covers every key: it writes, the others add
                scores_grad = torch._softmax_backward_data(torch.bmm(g[:, lo:hi], vc[:, :hi].transpose(1, 2)), p,
                                                           -1, p.dtype)
                if hi == t:
                    torch.bmm(p.transpose(1, 2), g[:, lo:hi], out=gv)
                    torch.bmm(scores_grad.transpose(1, 2), qc[:, lo:hi], out=gk)
                else:
                    gv[:, :hi] += torch.bmm(p.transpose(1, 2), g[:, lo:hi])
                    gk[:, :hi] += torch.bmm(scores_grad.transpose(1, 2), qc[:, lo:hi])
                gq[:, lo:hi] = torch.bmm(scores_grad, kc[:, :hi])
            gq.mul_(ctx.scale)
            gk.mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None


_block_causal_attention = chunked_sublayers.eager(_BlockCausalAttention.apply)
