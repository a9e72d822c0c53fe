"""fused_linear_log_probs against autograd through hidden @ weightᵀ → float64 log-softmax.

Small tiles (monkeypatched) force several token and vocabulary chunks, none dividing the
data evenly, so the cross-chunk merge and the tiled backward are what is tested.
Tolerances as in test_log_probs.py; bf16 *inputs* give bf16 gradients (checked at 1e-2
relative). bf16 tile matmuls run in bf16 where the CPU does them in hardware (bf16 logits,
values checked at 1e-2 relative) and in fp32 elsewhere (values fp32-accurate); both modes
are tested on every machine.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.kernels import fused_linear, fused_linear_log_probs, fused_linear_log_probs_and_kl
from megatron_rpp.kernels.reference import naive_linear_log_probs, naive_log_probs

N, H, V = 45, 32, 700


@pytest.fixture(params=[16, 64], ids=["3x3-tiles", "1x3-tiles"])
def small_tiles(monkeypatch, request):
    """3 × 3 ragged tiles (dL/dweight accumulated over token tiles), or one token tile × 3
    (dL/dweight written by one matmul per vocabulary chunk)."""
    rows = request.param
    monkeypatch.setattr(fused_linear, "chunk_shape", lambda device, n, v: (min(rows, n), 256))


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:6] = torch.tensor([0, V - 1, 255, 256, 511, -100])  # ends, tile edges, padding
    return hidden, weight, labels


@pytest.mark.parametrize("dtype,native_bf16", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True)])
def test_values_and_grads_match_float64(backend, dtype, native_bf16, small_tiles, rel_err, monkeypatch):
    monkeypatch.setattr(fused_linear, "native_cpu_matmul", lambda dt: native_bf16)
    hidden, weight, labels = _inputs(dtype)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs, entropy = fused_linear_log_probs(h, w, labels, temperature=1.3, with_entropy=True)
    (w_lp * log_probs + w_ent * entropy).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_lp, ref_ent = naive_linear_log_probs(h64, w64, labels, 1.3, True, dtype=torch.float64)
    (w_lp * ref_lp + w_ent * ref_ent).sum().backward()
    if native_bf16:  # bf16 logits, as in the naive path
        assert 1e-5 < rel_err(log_probs, ref_lp) < 1e-2 and rel_err(entropy, ref_ent) < 1e-2
    else:
        torch.testing.assert_close(log_probs.double(), ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)
    assert log_probs[5] == 0  # padding label
    assert h.grad.dtype == w.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=0)
    elif not native_bf16:
        assert rel_err(h.grad, h64.grad) < 1e-2 and rel_err(w.grad, w64.grad) < 1e-2
    else:
        # bf16 logits and bf16 dL/dlogits, exactly as autograd through the naive bf16 path: at
        # H = 32 both reach 1.6e-2 max-abs (0.8e-2 in norm) over seeds. Checked in norm, and
        # against the naive path's own error on the same inputs.
        hn, wn = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp_n, ent_n = naive_linear_log_probs(hn, wn, labels, 1.3, True)
        (w_lp * lp_n + w_ent * ent_n).sum().backward()
        for ours, naive, exact in ((h.grad, hn.grad, h64.grad), (w.grad, wn.grad, w64.grad)):
            err, err_naive = _norm_rel_err(ours, exact), _norm_rel_err(naive, exact)
            assert err < 1e-2 and err < 1.25 * err_naive, (err, err_naive)


@pytest.mark.parametrize("real", [700, 300], ids=["padding-mid-tile", "whole-padding-tiles"])
def test_padded_vocabulary_rows(backend, small_tiles, real):
    """weight has V' = 768 rows of which ``real`` are tokens (vocab_size=real): the padding rows
    (random, not zero, so a leak would show) are never multiplied and get exactly zero gradient;
    values and gradients equal float64 math on the real rows. With 256-column tiles, 700 ends
    inside the last tile; 300 leaves the third tile entirely padding."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(768, H, generator=g) * 0.4
    labels = torch.randint(0, real, (N,), generator=g)
    labels[:3] = torch.tensor([real - 1, real, 767])  # last token, first and last padding id
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs, entropy = fused_linear_log_probs(h, w, labels, temperature=1.3, with_entropy=True, vocab_size=real)
    (w_lp * log_probs + w_ent * entropy).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight[:real].double().requires_grad_()
    ref_lp, ref_ent = naive_linear_log_probs(h64, w64, labels, 1.3, True, dtype=torch.float64)
    (w_lp * ref_lp + w_ent * ref_ent).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=1e-5)
    assert (log_probs[1:3] == 0).all()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad[:real].double(), w64.grad, atol=1e-5, rtol=0)
    assert (w.grad[real:] == 0).all()


def _norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_kl_and_leading_dims(small_tiles):
    hidden, weight, labels = _inputs(torch.float32, seed=2)
    hidden, labels = hidden[:44].view(4, 11, H), labels[:44].view(4, 11)  # [B, T, H], [B, T]
    ref_log_probs = torch.full(labels.shape, -7.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_log_probs_and_kl(h, w, labels, ref_log_probs, kl_estimator="k3")
    assert out.log_probs.shape == out.kl.shape == (4, 11)
    (out.log_probs.sum() + out.kl.sum()).backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    from megatron_rpp.algorithms import kl_estimate

    lp64 = naive_log_probs(h64 @ w64.T, labels, dtype=torch.float64)
    kl64 = torch.where(labels >= 0, kl_estimate(lp64, ref_log_probs.double(), "k3"), torch.zeros_like(lp64))
    (lp64.sum() + kl64.sum()).backward()
    torch.testing.assert_close(out.kl.double(), kl64, atol=1e-5, rtol=1e-5)
    # k3's gradient reaches e^{|δ|} ≈ 10 here, so the gradients get a relative tolerance too.
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def test_default_tiles_cover_small_inputs_in_one_tile():
    assert fused_linear.chunk_shape(torch.device("cpu"), 45, 700) == (45, 700)
    rows, cols = fused_linear.chunk_shape(torch.device("cpu"), 8192, 152064)
    assert rows * cols <= 1 << 22  # one fp32 tile ≤ 16 MiB on CPU


def test_bad_weight_is_rejected():
    hidden, weight, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_log_probs(hidden, weight[:, :5], labels)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_log_probs(hidden, weight.double(), labels)
