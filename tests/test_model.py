"""Presets build real HF Llama models; parameter counts are exact; FLOPs reproduce the paper's Table 3."""

import pytest
import torch

from smalltalk.config import ModelConfig
from smalltalk.errors import SmalltalkError
from smalltalk.flops import exact_forward_flops, forward_flops, paper_forward_flops
from smalltalk.llama import PRESETS, count_params, hf_config, resolve_spec


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_is_exact(name):
    from transformers import LlamaForCausalLM

    spec = resolve_spec(ModelConfig(preset=name), PRESETS[name].vocab_size or 1024)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config(spec, 64))
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_preset_sizes_match_their_names():
    def params(name):
        return count_params(resolve_spec(ModelConfig(preset=name), PRESETS[name].vocab_size or 1024)) / 1e6

    assert params("paper-router-4.4m") == pytest.approx(4.4, abs=0.05)
    assert params("paper-335m") == pytest.approx(335, rel=0.01)
    assert params("paper-1.3b") == pytest.approx(1300, rel=0.03)
    for name, size in [("cpu-router-0.1m", 0.1), ("cpu-router-0.5m", 0.5), ("cpu-expert-0.5m", 0.5),
                       ("cpu-expert-2m", 2), ("cpu-expert-7m", 7)]:
        assert params(name) == pytest.approx(size, rel=0.1), name


def test_paper_table3_training_flops():
    """Training = 3 x forward (backward is twice the forward), at the paper's batch 512 x 1024."""
    assert 3 * paper_forward_flops(512, 1024, 1024, 24, 4096, 32000) * 256_000 / 1e19 == pytest.approx(31.02, abs=5e-3)
    assert 3 * paper_forward_flops(512, 1024, 2048, 24, 8192, 32000) * 512_000 / 1e19 == pytest.approx(221.33, abs=5e-3)


def test_paper_inference_flops_per_sequence():
    assert paper_forward_flops(1, 1024, 1024, 24, 4096, 32000) / 1e12 == pytest.approx(0.79, abs=0.005)
    assert paper_forward_flops(1, 1024, 2048, 24, 8192, 32000) / 1e12 == pytest.approx(2.81, abs=0.005)
    spec = PRESETS["paper-335m"]
    assert forward_flops(spec, 1024, 1, "paper") / 1e12 == pytest.approx(0.79, abs=0.005)


def test_exact_flops_close_to_6n_rule_for_short_sequences():
    spec = resolve_spec(ModelConfig(preset="cpu-expert-7m"), 1024)
    # Without the S² attention term, forward FLOPs per token = 2 × (matmul params incl. LM head).
    matmul_params = count_params(spec, embeddings=False) + spec.vocab_size * spec.hidden_size
    no_attention = exact_forward_flops(spec, 1) / 1
    assert no_attention == pytest.approx(2 * matmul_params, rel=0.01)


def test_vocab_mismatch_and_bad_dims():
    with pytest.raises(SmalltalkError, match="vocab/model mismatch"):
        resolve_spec(ModelConfig(preset="test-tiny", vocab_size=999), 384)
    with pytest.raises(SmalltalkError, match="unknown model preset"):
        resolve_spec(ModelConfig(preset="nope"), 384)
    with pytest.raises(SmalltalkError, match="heads"):
        resolve_spec(ModelConfig(preset="test-tiny", num_heads=3), 384)
