"""Batched prefix log-likelihoods of E router LMs: an [N, E] float32 matrix.

score[i, e] = sum_{s=1}^{M-1} log p_e(x_{s+1} | x_{1:s}): the first token is not scored. Each batch of
prefixes is read once and given to every router (a loop over E routers; see docs/routing.md for why
not stacked). On CPU the routers of a batch run side by side in `workers` threads, each with its share
of the intra-op threads: tiny routers keep one core busier than two cores splitting every small op.
The LM head runs block by block: log p = -cross_entropy(logits, target), so only one block of logits
exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from smalltalk.training.linear_cross_entropy import chunked_logprobs

# Logits per LM-head block and intra-op thread. On CPU 256k fp32 logits (1 MB) stay in a core's L2
# between the matmul that writes them and the cross-entropy that reads them: at V = 1k and d = 48, one
# thread runs 256-row blocks at 66% of its matmul peak and 2,048-row ones at 54%
# (benchmarks/speed/bench_routing.py --head). On GPU, blocks only bound memory.
HEAD_BLOCK_LOGITS = {"cpu": 1 << 18, "cuda": 1 << 26}


def head_block_rows(vocab_size: int, device: torch.device) -> int:
    per_thread = HEAD_BLOCK_LOGITS.get(device.type, HEAD_BLOCK_LOGITS["cuda"])
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    return max(64, per_thread * threads // vocab_size)


@torch.inference_mode()
def prefix_loglik(model, input_ids: torch.Tensor, body=None) -> torch.Tensor:
    """[B] float32 summed log-likelihood of tokens 2..M of each row given their past.

    Per LM-head block (training/linear_cross_entropy.chunked_logprobs), -cross_entropy(logits, target) =
    logit[target] - logsumexp(logits) in one fused kernel (2x faster than the two ops on CPU); the full
    [B, M, V] logits are never held. `body` may be a compiled `model.model`.
    """
    batch, length = input_ids.shape
    body = body if body is not None else model.model
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # no KV cache objects
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    weight = model.lm_head.weight
    out = chunked_logprobs(hidden, weight.T, targets, head_block_rows(weight.shape[0], hidden.device))
    return out.view(batch, length - 1).sum(dim=1)


def scoring_body(model, compile: bool = False):
    """The model's transformer body, optionally torch.compile'd (~20 s per router to compile). A
    hand-fused Llama body was tried and measured slower than HF's at d = 48."""
    return torch.compile(model.model, dynamic=True) if compile else model.model


def default_workers(device: torch.device | str, experts: int) -> int:
    """Routers scored at once: on CPU one per intra-op thread (up to E); on GPU one (a single stream)."""
    return min(experts, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


@torch.inference_mode()
def score_batches(models: Sequence[torch.nn.Module], get_batch: Callable[[np.ndarray], np.ndarray],
                  ids: np.ndarray, batch_size: int, device: torch.device | str = "cpu",
                  autocast_dtype: torch.dtype | None = None, bodies: Sequence | None = None,
                  workers: int = 1) -> np.ndarray:
    """Score sequences `ids` (prefix tokens from `get_batch`) with every model: [len(ids), E] float32.

    workers > 1 (CPU): the E routers of each batch run in that many threads, the intra-op threads split
    between them, and the caller's thread count restored afterwards.
    """
    device = torch.device(device)
    out = np.empty((len(ids), len(models)), dtype=np.float32)
    for model in models:
        model.eval()

    def score_one(e: int, x: torch.Tensor) -> np.ndarray:
        # autocast and inference mode are thread-local: set them in the thread that runs the router
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None):
            return prefix_loglik(models[e], x, bodies[e] if bodies else None).cpu().numpy()

    workers = max(1, min(workers, len(models)))
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                              initargs=(max(1, threads // workers),)) if workers > 1 else None
    try:
        for start in range(0, len(ids), batch_size):
            x = torch.from_numpy(get_batch(ids[start:start + batch_size])).to(device)
            if pool is None:
                columns = [score_one(e, x) for e in range(len(models))]
            else:
                columns = list(pool.map(score_one, range(len(models)), [x] * len(models)))
            out[start:start + len(x)] = np.stack(columns, axis=1)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)  # the workers' setting is process-wide
    return out
