"""FLOPs accounting, two ways, and a measured matmul peak for MFU.

(a) `paper`: the paper's formula (its Table 3), forward FLOPs per step
    B·S·H + L·(8·B·S·H² + 4·B·S²·H + 4·B·S·H·Dff) + 2·B·S·H·V + 3·B·S·V, training = 3 × forward.
    For our SwiGLU models Dff is the equivalent plain-MLP width 1.5 × intermediate_size.
(b) `exact`: 2·m·n·k for every matmul of our Llama (q, k, v, o, QKᵀ and AV over the full S×S,
    three SwiGLU projections, LM head); norms, softmax and RoPE are left out. Training = 3 × forward.
"""

from __future__ import annotations

import time

from smalltalk.llama import ModelSpec


def paper_forward_flops(B: int, S: int, H: int, L: int, Dff: int, V: int) -> float:
    return float(B * S * H + L * (8 * B * S * H**2 + 4 * B * S**2 * H + 4 * B * S * H * Dff)
                 + 2 * B * S * H * V + 3 * B * S * V)


def exact_forward_flops(spec: ModelSpec, S: int, B: int = 1) -> float:
    h, kv = spec.hidden_size, spec.kv_heads * spec.head_dim
    proj = 2 * S * h * (2 * h + 2 * kv)
    attention = 2 * 2 * S * S * h
    mlp = 3 * 2 * S * h * spec.intermediate_size
    head = 2 * S * h * spec.vocab_size
    return float(B * (spec.num_layers * (proj + attention + mlp) + head))


def forward_flops(spec: ModelSpec, S: int, B: int = 1, accounting: str = "exact") -> float:
    if accounting == "exact":
        return exact_forward_flops(spec, S, B)
    if accounting == "paper":
        dff = spec.paper_dff or round(1.5 * spec.intermediate_size)
        return paper_forward_flops(B, S, spec.hidden_size, spec.num_layers, dff, spec.vocab_size)
    raise ValueError(f"unknown FLOPs accounting {accounting!r} (use 'exact' or 'paper')")


def training_flops(spec: ModelSpec, S: int, B: int, steps: int, accounting: str = "exact") -> float:
    return 3.0 * forward_flops(spec, S, B, accounting) * steps


_PEAK_CACHE: dict[tuple, float] = {}


def measure_matmul_peak(device: str = "cpu", dtype: str = "float32", size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a large square matmul on this device: the practical peak MFU is measured against."""
    import torch

    key = (device, dtype, size, torch.get_num_threads() if device == "cpu" else 0)  # the peak depends on all
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: training resumes it
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    _PEAK_CACHE[key] = 2.0 * size**3 / best
    return _PEAK_CACHE[key]
