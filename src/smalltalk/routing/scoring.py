"""Batched prefix log-likelihoods of E router LMs: an [N, E] float32 matrix.

score[i, e] = sum_{s=1}^{M-1} log p_e(x_{s+1} | x_{1:s}): the first token is not scored. Each batch of
prefixes is read once and given to every router (a loop over E routers; see docs/routing.md for why
not stacked). Only the logits are materialised, never a log-softmax tensor: log p = logit[target] -
logsumexp(logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


@torch.inference_mode()
def prefix_loglik(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B] float32 summed log-likelihood of tokens 2..M of each row given their past."""
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    logits = model.lm_head(hidden).float()
    targets = input_ids[:, 1:]
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (target_logits - torch.logsumexp(logits, dim=-1)).sum(dim=1)


@torch.inference_mode()
def score_batches(models: Sequence[torch.nn.Module], get_batch: Callable[[np.ndarray], np.ndarray],
                  ids: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Score sequences `ids` (prefix tokens from `get_batch`) with every model: [len(ids), E] float32."""
    device = torch.device(device)
    out = np.empty((len(ids), len(models)), dtype=np.float32)
    for model in models:
        model.eval()
    for start in range(0, len(ids), batch_size):
        x = torch.from_numpy(get_batch(ids[start:start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            for e, model in enumerate(models):
                out[start:start + len(x), e] = prefix_loglik(model, x).cpu().numpy()
    return out
