"""Model presets and construction: every model is a Hugging Face LlamaForCausalLM.

RoPE, RMSNorm, SwiGLU and SDPA attention come with Llama. The paper's models use a plain 4H MLP; we
use SwiGLU with intermediate = 2/3 * 4H, which has the same parameters and FLOPs (see flops.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from smalltalk.config import ModelConfig
from smalltalk.errors import SmalltalkError
from smalltalk.layout import HF_CONFIG, WEIGHTS, WEIGHTS_INDEX


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int | None = None  # None: taken from the tokenizer
    num_kv_heads: int | None = None
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    paper_dff: int | None = None  # the paper's plain-MLP width, for its FLOPs formula (default 1.5 × ffn)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, ModelSpec] = {
    # The paper's router (4.4M with a 32k vocabulary) and experts.
    "paper-router-4.4m": ModelSpec(96, 12, 12, 256, vocab_size=32000, paper_dff=384),
    "paper-335m": ModelSpec(1024, 24, 16, 2736, vocab_size=32000, paper_dff=4096),
    "paper-1.3b": ModelSpec(2048, 24, 16, 5464, vocab_size=32000, paper_dff=8192),
    # CPU presets; the names give the size at a 1k vocabulary.
    "cpu-router-0.005m": ModelSpec(8, 1, 1, 16),  # the paper's router:expert cost ratio is ~1:75 per token
    "cpu-router-0.01m": ModelSpec(16, 1, 2, 32),
    "cpu-router-0.03m": ModelSpec(32, 1, 2, 64),
    "cpu-router-0.1m": ModelSpec(48, 2, 4, 128),
    "cpu-router-0.5m": ModelSpec(96, 4, 4, 256),
    "cpu-expert-0.04m": ModelSpec(32, 2, 2, 86),  # the winning regime of shared/notes/scale-regime.md
    "cpu-expert-0.15m": ModelSpec(64, 2, 4, 172),
    "cpu-expert-0.5m": ModelSpec(96, 4, 4, 256),
    "cpu-expert-2m": ModelSpec(192, 4, 6, 512),
    "cpu-expert-7m": ModelSpec(256, 8, 8, 680),  # 680 ≈ 8d/3: the rule above (it was 3d, 12% more MLP)
    # For unit tests.
    "test-tiny": ModelSpec(32, 1, 2, 64),
}


def resolve_spec(cfg: ModelConfig, vocab_size: int) -> ModelSpec:
    """Preset + explicit overrides, with the vocabulary checked against the tokenizer's."""
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise SmalltalkError(f"unknown model preset {cfg.preset!r}", fix=f"use one of {', '.join(PRESETS)}")
    base = PRESETS[cfg.preset] if cfg.preset else None
    fields = {
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "num_kv_heads": cfg.num_kv_heads,
        "tie_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
    }
    overrides = {k: v for k, v in fields.items() if v is not None}
    if base is None:
        missing = [k for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if k not in overrides]
        if missing:
            raise SmalltalkError(f"model without preset needs {', '.join(missing)}",
                                 fix="set model.preset or all model dimensions")
        base = ModelSpec(**{k: overrides.pop(k) for k in ("hidden_size", "num_layers", "num_heads",
                                                           "intermediate_size")})
    spec = dataclasses.replace(base, **overrides)
    wanted = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if cfg.vocab_size is not None and cfg.vocab_size != vocab_size:
        raise SmalltalkError(
            f"vocab/model mismatch: model.vocab_size={cfg.vocab_size} but the tokenizer has {vocab_size} tokens",
            fix="drop model.vocab_size (it defaults to the tokenizer's) or use the matching tokenizer")
    spec = dataclasses.replace(spec, vocab_size=wanted)
    if spec.hidden_size % spec.num_heads or spec.head_dim % 2:
        raise SmalltalkError(f"hidden_size {spec.hidden_size} must split into {spec.num_heads} heads of even size")
    if spec.num_heads % spec.kv_heads:
        raise SmalltalkError(f"num_heads {spec.num_heads} must be a multiple of num_kv_heads {spec.kv_heads}")
    return spec


def hf_config(spec: ModelSpec, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=spec.tie_embeddings, rope_theta=spec.rope_theta, hidden_act="silu",
        rms_norm_eps=spec.rms_norm_eps, attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attn_implementation="sdpa")


def build_model(spec: ModelSpec, max_positions: int, seed: int = 0):
    """A freshly initialised LlamaForCausalLM (seeded, so two builds are bitwise equal)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = hf_config(spec, max_positions)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def rope_theta_of(config) -> float:
    """RoPE's base from an HF config: `rope_parameters` (transformers 5) or `rope_theta` (older files)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def spec_from_hf(config) -> ModelSpec:
    return ModelSpec(
        hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size, num_kv_heads=config.num_key_value_heads,
        tie_embeddings=bool(config.tie_word_embeddings), rope_theta=rope_theta_of(config),
        rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-5)))


def pretrained_spec(directory: Path, vocab_size: int | None = None) -> ModelSpec:
    """The architecture of a local HF Llama checkpoint, or one clear error saying why it cannot be an expert."""
    config_file = directory / HF_CONFIG
    fix = "point experts.pretrained at a directory saved by LlamaForCausalLM.save_pretrained (safetensors)"
    if not config_file.is_file():
        raise SmalltalkError(f"{directory} is not a Hugging Face checkpoint: no config.json", where=str(directory),
                             fix=fix)
    if not (directory / WEIGHTS).is_file() and not (directory / WEIGHTS_INDEX).is_file():
        raise SmalltalkError(f"{directory} has no safetensors weights (model.safetensors or its index)",
                             where=str(directory), fix=fix + "; convert .bin weights with save_pretrained")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise SmalltalkError(f"unreadable config: {exc}", where=str(config_file), fix=fix) from None
    if config.model_type != "llama":
        raise SmalltalkError(f"{directory} is not a plain Llama checkpoint this trainer builds (model_type "
                             f"{config.model_type!r})", where=str(config_file), fix="use a LlamaForCausalLM checkpoint")
    unsupported = {"hidden_act": (config.hidden_act, "silu"),
                   "attention_bias": (getattr(config, "attention_bias", False), False),
                   "mlp_bias": (getattr(config, "mlp_bias", False), False),
                   "rope type": ((getattr(config, "rope_parameters", None) or {}).get("rope_type", "default"),
                                 "default"),
                   "head_dim": (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                                config.hidden_size // config.num_attention_heads)}
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
        raise SmalltalkError(f"{directory} is not a plain Llama checkpoint this trainer builds ({bad})",
                             where=str(config_file), fix="use a LlamaForCausalLM with SiLU MLPs, no biases, "
                             "default RoPE and head_dim = hidden_size / heads")
    spec = spec_from_hf(config)
    if vocab_size is not None and spec.vocab_size != vocab_size:
        raise SmalltalkError(f"{directory} has {spec.vocab_size} embedding rows but the run's tokenizer "
                             f"{vocab_size} tokens", where=str(config_file),
                             fix="resize its embeddings to the tokenizer (model.resize_token_embeddings(len(tok))) "
                                 "and save it again")
    return spec


def count_params(spec: ModelSpec, embeddings: bool = True) -> int:
    """Exact parameter count of the HF model built from `spec` (tested against numel())."""
    h, kv = spec.hidden_size, spec.kv_heads * spec.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * spec.intermediate_size + 2 * h  # attn, mlp, two norms
    body = spec.num_layers * per_layer + h  # + final norm
    if not embeddings:
        return body
    emb = spec.vocab_size * h
    return body + emb * (1 if spec.tie_embeddings else 2)


def describe(spec: ModelSpec) -> str:
    return (f"d={spec.hidden_size} L={spec.num_layers} H={spec.num_heads} ffn={spec.intermediate_size} "
            f"V={spec.vocab_size} params={count_params(spec) / 1e6:.3f}M "
            f"(non-embedding {count_params(spec, embeddings=False) / 1e6:.3f}M)")


def quiet_transformers() -> None:
    """Silence transformers' per-file progress bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
