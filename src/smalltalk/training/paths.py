"""Which training forward a job runs: decided here, once per job, from the device and the model.

- `auto` on CPU, for a Llama it covers → `cpu-fused`: training/forward.py, HF's weights and math through
  the CPU kernels (training/cpu/: cache-sized chunked sublayers, blocked causal attention, a hand-derived
  RMSNorm backward) and the chunked linear cross-entropy; measured faster than HF's forward on CPU
  (docs/benchmarks.md). Under bf16 autocast or torch.compile it runs its plain-expression variant.
- `auto` on CUDA with Liger-Kernel installed (`pip install smalltalk-lm[gpu]`), for a Llama → `liger`: HF's
  forward with SDPA attention and Liger-Kernel's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy.
- `auto` elsewhere (CUDA without Liger, MPS, a model the fused paths do not cover) → `hf`: HF's forward
  with SDPA attention (flash kernels where the GPU has them), the loss through the chunked linear
  cross-entropy, so the [batch, T, vocab] logits never exist.
Each is compiled when `train.compile` asks.

`cpu-fused` runs only on CPU: its kernels are tuned to CPU caches, and no GPU measurement has shown it
faster than the field's GPU path (benchmarks/checks/gpu_check.sh `forward` measures each path the GPU can take:
loss and gradients against HF's, forward + backward time). Any path can be named in `train.forward` to
measure or work around one; a path that cannot run where asked is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from smalltalk.config import FORWARDS
from smalltalk.errors import SmalltalkError


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def covers(model) -> bool:
    """Whether `model` is a Llama that the fused paths compute exactly as HF's forward does."""
    from transformers import LlamaForCausalLM

    c = getattr(model, "config", None)
    return (isinstance(model, LlamaForCausalLM) and not c.attention_bias and not getattr(c, "mlp_bias", False)
            and c.hidden_act == "silu" and not c.attention_dropout and getattr(c, "pretraining_tp", 1) == 1
            and getattr(c, "sliding_window", None) is None)


@dataclass(frozen=True)
class ForwardChoice:
    path: str  # "cpu-fused", "hf" or "liger"
    why: str  # one line for the job's log and summary


def choose_forward(requested: str, device: torch.device, model, liger: bool | None = None) -> ForwardChoice:
    """The training path for `model` on `device` (see the table above). `liger`: whether Liger-Kernel is
    installed (None: look)."""
    if requested not in FORWARDS:
        raise SmalltalkError(f"train.forward={requested!r}", fix=f"use one of {', '.join(FORWARDS)}")
    liger = liger_available() if liger is None else liger
    llama = covers(model)
    if requested == "auto":
        if device.type == "cpu" and llama:
            return ForwardChoice("cpu-fused", "CPU: the CPU kernels (measured faster than HF's forward there)")
        if device.type == "cuda" and llama and liger:
            return ForwardChoice("liger", "CUDA with Liger-Kernel installed: HF's forward + Liger's fused kernels")
        return ForwardChoice("hf", f"{device.type}: HF's forward (SDPA), chunked linear cross-entropy"
                             + ("" if llama else "; a model the fused paths do not cover"))
    if requested == "cpu-fused" and (device.type != "cpu" or not llama):
        raise SmalltalkError(f"train.forward=cpu-fused on {device.type}" + ("" if llama else " for a model it does "
                             "not cover"), fix="the CPU kernels run on CPU, for Llama models; use auto or hf")
    if requested == "liger" and not (device.type == "cuda" and llama and liger):
        raise SmalltalkError(f"train.forward=liger on {device.type}" + ("" if liger else " without Liger-Kernel"),
                             fix="Liger-Kernel runs on CUDA for Llama models: `pip install smalltalk-lm[gpu]`, "
                                 "or use auto or hf")
    return ForwardChoice(requested, f"train.forward={requested}")
