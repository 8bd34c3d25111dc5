"""Token-level perplexity: exp(total NLL / total predicted tokens), on all tokens or after a prefix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from smalltalk.data.shards import SplitData
from smalltalk.errors import SmalltalkError
from smalltalk.layout import HF_CONFIG
from smalltalk.training.distributed import resolve_device


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL [B, S-1] of tokens 1..S-1 given their past (float32)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@torch.inference_mode()
def sequence_nll(model, data: SplitData, ids: np.ndarray, batch_size: int, device: torch.device | str,
                 length: int | None = None, first_target: int = 1) -> tuple[float, int]:
    """Summed NLL and token count over `ids`, scoring positions >= first_target (0-based)."""
    model.eval()
    total, count = 0.0, 0
    first = max(1, first_target)
    for i in range(0, len(ids), batch_size):
        x = torch.from_numpy(data.batch(ids[i:i + batch_size], length)).to(device)
        nll = token_nll(model, x)[:, first - 1:]
        total += nll.double().sum().item()
        count += nll.numel()
    return total, count


def perplexity(model_dir: str | Path, data_dir: str | Path, split: str = "test", batch_size: int = 16,
               device: str = "cpu", first_target: int = 1, max_sequences: int | None = None) -> dict:
    """Perplexity of a saved HF model on a prepared split."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / HF_CONFIG).is_file():
        raise SmalltalkError(f"no HF model at {model_dir}", fix="pass the model/ directory a training run wrote")
    data = SplitData(data_dir, split)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device)
    if model.config.vocab_size != data.vocab_size:
        raise SmalltalkError(
            f"vocab/model mismatch: model vocab {model.config.vocab_size}, data vocab {data.vocab_size}",
            where=str(model_dir), fix="evaluate on data prepared with the model's tokenizer")
    ids = data.sample(max_sequences)
    n = len(ids)
    if n == 0:
        raise SmalltalkError(f"split {split!r} holds no sequences", where=str(data.dir))
    nll, tokens = sequence_nll(model, data, ids, batch_size, device, first_target=first_target)
    return {"model": str(model_dir), "split": split, "sequences": n, "tokens": tokens, "nll": nll,
            "loss": nll / tokens, "perplexity": math.exp(nll / tokens), "first_target": first_target}


@torch.inference_mode()
def batch_nll(model, tokens: np.ndarray, rows: np.ndarray, device, out: np.ndarray) -> None:
    """Fill out[rows] with the model's per-token NLL of tokens[rows] (float64)."""
    if len(rows):
        out[rows] = token_nll(model, torch.from_numpy(tokens[rows]).to(device)).cpu().numpy().astype(np.float64)
