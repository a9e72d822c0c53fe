"""Triton log-prob kernels compiled for CUDA (no interpreter) against float64 and the torch backend.

Skipped without CUDA (conftest). Realistic vocabulary sizes: the GPU block sizes
(BLOCK_V 4096 forward / 2048 backward) then take several column blocks per row, with a
ragged last block (32000 and 152064 are not multiples of 4096).
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.kernels import (
    BACKEND_ENV,
    fused_linear_log_probs,
    resolve_backend,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_kl,
)
from megatron_rpp.kernels.reference import naive_linear_log_probs, naive_log_probs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _inputs(n, v, dtype, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    logits = (torch.randn(n, v, device=CUDA, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device=CUDA, generator=g)
    labels[:4] = torch.tensor([0, v - 1, 4095, -100], device=CUDA)
    return logits, labels


def test_auto_backend_is_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend(CUDA).name == "triton"


@pytest.mark.parametrize("v", [32000, 152064])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_float64(monkeypatch, v, dtype):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    logits, labels = _inputs(257, v, dtype)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_log_probs(x, labels, temperature=0.8, with_entropy=True)
    (lp.sum() + 0.5 * ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    ref_lp, ref_ent = naive_log_probs(x64, labels, 0.8, True, dtype=torch.float64)
    (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-4, rtol=1e-5)  # Σ over 152k terms
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)
    else:
        assert _rel_err(x.grad, x64.grad) < 1e-2


def test_triton_equals_torch_backend_with_kl(monkeypatch):
    logits, labels = _inputs(300, 50000, torch.bfloat16, seed=1)
    ref = -torch.rand(300, device=CUDA) * 10
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        x = logits.clone().requires_grad_()
        out = vocab_parallel_log_probs_and_kl(x, labels, ref, kl_estimator="k3", with_entropy=True)
        (out.log_probs.sum() + out.kl.sum() + out.entropy.sum()).backward()
        results[backend] = (out.log_probs, out.kl, out.entropy, x.grad.float())
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5) if a.dim() == 1 else \
            torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=0)


def test_fused_linear_on_cuda(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    g = torch.Generator(device=CUDA).manual_seed(2)
    hidden = torch.randn(513, 256, device=CUDA, generator=g)
    weight = torch.randn(40000, 256, device=CUDA, generator=g) / 16
    labels = torch.randint(0, 40000, (513,), device=CUDA, generator=g)
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_linear_log_probs(h, w, labels).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = naive_linear_log_probs(h64, w64, labels, dtype=torch.float64)
    ref.sum().backward()
    assert _rel_err(h.grad, h64.grad) < 1e-4 and _rel_err(w.grad, w64.grad) < 1e-4
