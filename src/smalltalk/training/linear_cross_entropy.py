"""The output projection and cross-entropy in chunks, so the full [rows, vocab] logits never exist: the
training loss with its gradients (`linear_cross_entropy`) and the log-probabilities router scoring sums
(`chunked_logprobs`), one place for both.

`F.cross_entropy(h @ W.T, labels)` materialises four [rows, vocab] float32 tensors (logits, log-softmax,
the zero-filled gradient NLL's backward scatters into, the gradient log-softmax's backward writes) and
runs five passes over them. Here the rows go through in chunks: each chunk's logits become its gradient
in place (softmax minus one-hot, `exp(log_softmax) - onehot`), which is multiplied out at once into the
gradients of h and W, so one chunk-sized buffer is alive and three passes touch it. The backward pass only
scales the gradients kept from the forward (the loss is a scalar). Liger-Kernel's and Apple's
cut-cross-entropy's idea, in plain PyTorch ops.

On CPU a chunk stays under 16 MB: glibc hands out larger blocks as fresh mmaps, each page of which faults
on first touch (on the cpu-expert-2m batch, logits of 33 MB cost ~16k page faults a step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}  # logits per chunk: 16 MB float32 on CPU, 256 MB on GPUs


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits at most CHUNK_ELEMENTS (at least 64 rows, for the matmuls)."""
    return max(64, CHUNK_ELEMENTS.get(device.type, 1 << 24) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against labels (-100 ignored); gradients made in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        with torch.autocast(kind, enabled=False):
            loss, grad_h, grad_w = _loss_and_gradients(h, weight, labels, dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, (grad_w * grad).to(grad_w.dtype), None


def _loss_and_gradients(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss and its gradients for h and weight, chunk by chunk; matmuls in `dtype`, softmax in float32."""
    valid = labels != -100
    row_weight = valid.float() / valid.sum()  # each counted row's share of the mean (no count: nan, as PyTorch's)
    targets = labels.clamp(min=0)[:, None]
    w = weight.to(dtype)
    loss = h.new_zeros((), dtype=torch.float32)
    grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
    step = chunk_rows(weight.shape[0], h.device)
    for start in range(0, h.shape[0], step):
        rows = slice(start, start + step)
        hc, tc, rw = h[rows].to(dtype), targets[rows], row_weight[rows, None]
        probs = torch.log_softmax(hc @ w.T, dim=1, dtype=torch.float32)
        loss -= probs.gather(1, tc).squeeze(1) @ rw.squeeze(1)
        probs.exp_().scatter_add_(1, tc, torch.full_like(tc, -1, dtype=probs.dtype))  # softmax - onehot
        probs = probs.to(dtype)
        grad_h[rows] = (probs @ w).mul_(rw)
        if dtype == grad_w.dtype:
            grad_w.addmm_(probs.T, hc * rw)
        else:
            grad_w += probs.T @ (hc * rw).to(dtype)
    return loss, grad_h, grad_w.to(weight.dtype)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100)` for h [rows, d], weight
    [vocab, d]: the same loss and gradients, computed chunk by chunk (without gradients, by
    `chunked_logprobs`). Under torch.compile the plain expression is traced instead (Inductor fuses it)."""
    if torch.compiler.is_compiling():
        return F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100)
    if not (h.requires_grad or weight.requires_grad):  # no gradients: the log-probs router scoring sums
        keep = labels != -100
        logp = chunked_logprobs(h[keep], weight.T, labels[keep], chunk_rows(weight.shape[0], h.device))
        return -logp.mean()
    return _LinearCrossEntropy.apply(h, weight, labels)


def chunked_logprobs(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, block_rows: int) -> torch.Tensor:
    """log p(target) of each row, float32, `block_rows` rows at a time: hidden [N, d] with head [d, V], or
    E heads at once, hidden [E, N, d] with head [E, d, V] and the same N targets for every head ([E, N])."""
    out = torch.empty(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
    stacked = hidden.dim() == 3
    for start in range(0, hidden.shape[-2], block_rows):
        logits = (hidden[..., start:start + block_rows, :] @ head).float()  # [rows, V] or [E, rows, V]
        rows = logits.shape[-2]
        target = targets[start:start + rows]
        if stacked:
            target = target.repeat(hidden.shape[0])
        out[..., start:start + rows] = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target,
                                                        reduction="none").view(logits.shape[:-1])
    return out
