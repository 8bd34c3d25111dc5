"""Batched prefix log-likelihoods of E router LMs: an [N, E] float32 matrix.

score[i, e] = sum_{s=1}^{M-1} log p_e(x_{s+1} | x_{1:s}): the first token is not scored. Each batch of
prefixes is read once and given to every router (a loop over E routers; see docs/routing.md for why
not stacked). The LM head runs block by block (HEAD_CHUNK positions): log p = -cross_entropy(logits,
target), so only one block of logits exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HEAD_CHUNK = 2048  # token rows per LM-head block: the logits block stays in cache (2-3x faster on CPU)


@torch.inference_mode()
def prefix_loglik(model, input_ids: torch.Tensor, body=None) -> torch.Tensor:
    """[B] float32 summed log-likelihood of tokens 2..M of each row given their past.

    The LM head runs over blocks of HEAD_CHUNK positions: per block, -cross_entropy(logits, target) =
    logit[target] - logsumexp(logits), so the full [B, M, V] logits are never held (one block is). `body` may be a
    compiled `model.model`.
    """
    batch, length = input_ids.shape
    body = body if body is not None else model.model
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # no KV cache objects
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    weight = model.lm_head.weight
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = (hidden[start:start + HEAD_CHUNK] @ weight.T).float()
        # cross_entropy = logsumexp - logit[target] in one fused kernel: 2x faster than the two ops on CPU
        out[start:start + HEAD_CHUNK] = -F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="none")
    return out.view(batch, length - 1).sum(dim=1)


def scoring_body(model, compile: bool = False):
    """The model's transformer body, optionally torch.compile'd (~20 s per router to compile; worth it for
    long partitions). A hand-fused Llama body was tried and measured slower than HF's at d = 48."""
    return torch.compile(model.model, dynamic=True) if compile else model.model


@torch.inference_mode()
def score_batches(models: Sequence[torch.nn.Module], get_batch: Callable[[np.ndarray], np.ndarray],
                  ids: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None, bodies: Sequence | None = None) -> np.ndarray:
    """Score sequences `ids` (prefix tokens from `get_batch`) with every model: [len(ids), E] float32."""
    device = torch.device(device)
    out = np.empty((len(ids), len(models)), dtype=np.float32)
    for model in models:
        model.eval()
    for start in range(0, len(ids), batch_size):
        x = torch.from_numpy(get_batch(ids[start:start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            for e, model in enumerate(models):
                out[start:start + len(x), e] = prefix_loglik(model, x, bodies[e] if bodies else None).cpu().numpy()
    return out
