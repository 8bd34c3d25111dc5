"""The training forward paths: which one a job runs (training/paths.py), each giving HF's loss and gradients,
and torch.compile on CPU."""

import dataclasses
import json

import pytest
import torch

from smalltalk.config import ModelConfig
from smalltalk.errors import SmalltalkError
from smalltalk.llama import build_model, resolve_spec
from smalltalk.training import linear_cross_entropy
from smalltalk.training.cpu import attention as causal_attention
from smalltalk.training.cpu import sublayers as chunked_sublayers
from smalltalk.training.cpu.rms_norm import normalize
from smalltalk.training.cpu.sublayers import rotary
from smalltalk.training.forward import TrainingForward, causal_lm_loss
from smalltalk.training.paths import choose_forward, covers

from .conftest import TINY_CONFIG, cli


def _model(kv_heads: int | None = None, seed: int = 0):
    spec = dataclasses.replace(resolve_spec(ModelConfig(preset="cpu-expert-0.15m"), 256), num_kv_heads=kv_heads)
    model = build_model(spec, 48, seed=seed)
    for p in model.parameters():  # norms start at 1: perturb them so their gradients mean something
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return model


def _loss_and_grads(model, fn):
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("path", ["chunks", "small chunks", "plain"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_loss_and_gradients_equal_hfs(kv_heads, path, monkeypatch):
    """Loss and every parameter's gradient as HF's forward gives them (GQA too, labels with -100), by the
    CPU's chunked sublayers and loss (one chunk; several, the last one short) and by the plain expressions
    GPUs and autocast take."""
    if path == "small chunks":  # 3 chunks of one sequence; MLP rows 128 + 16; loss rows 64 + 64 + 13
        monkeypatch.setattr(chunked_sublayers, "CHUNK_BYTES", 2048)
        monkeypatch.setitem(linear_cross_entropy.CHUNK_ELEMENTS, "cpu", 64 * 256)
        monkeypatch.setattr(causal_attention, "QUERY_BLOCK", 20)  # query rows 20 + 20 + 8
    if path == "plain":
        monkeypatch.setattr(chunked_sublayers, "chunked", lambda x: False)
    model = _model(kv_heads)
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :20] = -100  # an SFT-style mask
    hf_loss, hf_grads = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels))
    assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), hf_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name  # docs/benchmarks.md's "within 1e-6"


def test_bf16_autocast_loss_and_gradients_are_hfs_within_rounding():
    model = _model()
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_loss, hf_grads = _loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
        loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, ids))
    assert loss.item() == pytest.approx(hf_loss.item(), rel=3e-3)
    for (name, p), a, b in zip(model.named_parameters(), hf_grads, grads, strict=True):
        assert a.dtype == b.dtype == p.dtype, name
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name


def test_compiled_expressions_equal_the_autograd_functions(monkeypatch):
    """The plain expressions traced under torch.compile compute what the eager functions do."""
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    theta = torch.rand(5, 1, 4) * 6
    cos, sin = theta.cos(), theta.sin()
    h = torch.randn(2, 5, 16, requires_grad=True)
    eager = [rotary(x, cos, sin), normalize(h, 1e-5)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = [rotary(x, cos, sin), normalize(h, 1e-5)]
    inputs = [x, h]
    for a, b in zip(eager, traced, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        g = torch.randn_like(a)
        grads_a = torch.autograd.grad(a, inputs, g, allow_unused=True, materialize_grads=True)
        grads_b = torch.autograd.grad(b, inputs, g, allow_unused=True, materialize_grads=True)
        for ga, gb in zip(grads_a, grads_b, strict=True):
            assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [64, 20])
def test_block_causal_attention_equals_pytorchs_kernel(block, monkeypatch):
    """Values and gradients of q, k, v as F.scaled_dot_product_attention's: one query block or three (the
    last one short), chunks of two sequences and one; the output laid out [B, T, H, D] as PyTorch's."""
    monkeypatch.setattr(causal_attention, "QUERY_BLOCK", block)
    monkeypatch.setattr(chunked_sublayers, "CHUNK_BYTES", 4 * 4 * min(block, 48) * 48 * 2)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 48, 4, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    grad = torch.randn(3, 48, 4, 16, generator=g).transpose(1, 2)
    ours = causal_attention.causal_attention(q, k, v, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert type(ours.grad_fn).__name__ == "_BlockCausalAttentionBackward"
    assert ours.transpose(1, 2).is_contiguous() and torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [q, k, v], grad), torch.autograd.grad(ref, [q, k, v], grad), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_long_sequences_take_pytorchs_attention_kernel():
    """Past 8 × head dim the kept probabilities would outweigh q, k and v: flash's kernel runs instead."""
    def kernel(t: int) -> str:
        q, k, v = (torch.randn(2, 4, t, 16, requires_grad=True) for _ in range(3))
        return type(causal_attention.causal_attention(q, k, v, 0.25).grad_fn).__name__

    assert kernel(128) == "_BlockCausalAttentionBackward"
    assert kernel(129) != "_BlockCausalAttentionBackward" and "Attention" in kernel(129)


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_equals_pytorchs_over_chunks(autocast, monkeypatch):
    """Chunked loss = F.cross_entropy(F.linear(h, W)): value and both gradients, -100 rows ignored, a short
    last chunk; under bf16 autocast as PyTorch's own autocast loss within rounding."""
    monkeypatch.setitem(linear_cross_entropy.CHUNK_ELEMENTS, "cpu", 64 * 50)
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(150, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (150,), generator=g)
    labels[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), labels, ignore_index=-100)
        ours = linear_cross_entropy.linear_cross_entropy(h, w, labels)
    tol = {"rtol": 2e-2, "atol": 1e-4} if autocast else {"rtol": 1e-5, "atol": 1e-7}
    assert ours.item() == pytest.approx(ref.item(), rel=tol["rtol"])
    for a, b in zip(torch.autograd.grad(ref, [h, w]), torch.autograd.grad(ours, [h, w]), strict=True):
        assert a.dtype == b.dtype and torch.allclose(a, b, **tol)
    assert linear_cross_entropy.chunk_rows(50, h.device) == 64  # three chunks: 64 + 64 + 22


def test_the_path_is_chosen_once_from_device_and_model():
    """auto: the CPU kernels on CPU only; Liger-Kernel on CUDA when installed, else HF's forward; HF's for a
    model the fused paths do not cover. A named path that cannot run there is an error."""
    model, cpu, cuda = _model(), torch.device("cpu"), torch.device("cuda")
    assert choose_forward("auto", cpu, model, liger=True).path == "cpu-fused"
    assert choose_forward("auto", cuda, model, liger=False).path == "hf"
    assert choose_forward("auto", cuda, model, liger=True).path == "liger"
    assert choose_forward("auto", torch.device("mps"), model, liger=True).path == "hf"
    assert choose_forward("hf", cpu, model).path == "hf"
    for asked, device in (("cpu-fused", cuda), ("liger", cpu), ("fast", cpu)):
        with pytest.raises(SmalltalkError):
            choose_forward(asked, device, model, liger=True)
    model.config.attention_bias = True  # as a loaded checkpoint with q/k/v biases would say
    assert not covers(model) and choose_forward("auto", cpu, model).path == "hf"
    with pytest.raises(SmalltalkError, match="does not cover"):
        choose_forward("cpu-fused", cpu, model)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_the_hf_path_gives_hfs_loss_and_gradients(kv_heads):
    """`hf` (what a GPU without Liger runs): HF's body, the head and loss in chunks: HF's loss and gradients."""
    torch.manual_seed(0)
    model = _model(kv_heads)
    ids = torch.randint(0, 256, (3, 48))
    labels = ids.clone()
    labels[0, :7] = -100
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    loss, grads = _loss_and_grads(model, lambda: TrainingForward(model, "hf")(ids, labels))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for a, b in zip(ref_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_it_does_not_cover_trains_through_hfs_forward():
    model = _model()
    model.config.attention_bias = True
    step = TrainingForward(model, choose_forward("auto", torch.device("cpu"), model).path)
    ids = torch.randint(0, 256, (2, 48))
    assert step.path == "hf"
    assert torch.allclose(step(ids, ids), model(input_ids=ids, labels=ids).loss, rtol=1e-5)


@pytest.mark.slow
def test_compiled_training_on_cpu_follows_eager(prepared_run, tmp_path):
    """`train.compile: true` works on CPU and trains as eager does (same losses within rounding)."""
    runs = {}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        out = tmp_path / name
        assert cli("train", "lm", "--config", TINY_CONFIG, "--run", prepared_run, "--out", out,
                   "--set", "train.steps=6", "--set", "train.log_every=1", "--set", f"train.compile={compile_}") == 0
        runs[name] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_loss_without_gradients_is_the_scoring_helpers(autocast):
    """Without gradients the loss goes through chunked_logprobs (router scoring's helper): the same value."""
    torch.manual_seed(0)
    h, w = torch.randn(150, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (150,))
    labels[:9] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), labels, ignore_index=-100)
        ours = linear_cross_entropy.linear_cross_entropy(h, w, labels)
    assert ours.item() == pytest.approx(ref.item(), rel=2e-2 if autocast else 1e-6)
