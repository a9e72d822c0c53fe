import math

import pytest
import torch

from megatron_rpp.algorithms import KL_ESTIMATORS, kl_estimate, kl_estimate_grad

F64 = torch.float64


def _lp(deltas):
    # log_probs = δ, ref_log_probs = 0
    d = torch.tensor(deltas, dtype=F64)
    return d, torch.zeros_like(d)


def test_hand_worked_values():
    lp, ref = _lp([0.0, 1.0, -1.0, math.log(2.0)])
    # k1 = δ
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), lp, rtol=0, atol=1e-15)
    # k2 = δ²/2: 0, 1/2, 1/2, (ln 2)²/2
    expected_k2 = torch.tensor([0.0, 0.5, 0.5, math.log(2.0) ** 2 / 2], dtype=F64)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), expected_k2, rtol=0, atol=1e-15)
    # k3 = e^{−δ} − 1 + δ: 0; e^{−1}; e − 2; 1/2 − 1 + ln 2 = ln 2 − 1/2
    expected_k3 = torch.tensor([0.0, math.exp(-1.0), math.e - 2.0, math.log(2.0) - 0.5], dtype=F64)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), expected_k3, rtol=0, atol=1e-15)


def test_delta_is_log_probs_minus_ref():
    # log_probs = 0.5, ref = 1.5 -> δ = −1 -> k1 = −1, k3 = e − 2
    lp = torch.tensor([0.5], dtype=F64)
    ref = torch.tensor([1.5], dtype=F64)
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(-1.0, abs=1e-15)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.e - 2.0, abs=1e-15)


def test_clamped_to_plus_minus_ten():
    lp, ref = _lp([20.0, -20.0, -1000.0, 1000.0])
    # k1: 20 -> 10, −20 -> −10; k2 = 200, 200, ... -> 10; k3: 19 -> 10, e^20 -> 10, e^1000 -> 10 (no inf)
    assert kl_estimate(lp, ref, "k1").tolist() == [10.0, -10.0, -10.0, 10.0]
    assert kl_estimate(lp, ref, "k2").tolist() == [10.0] * 4
    assert kl_estimate(lp, ref, "k3").tolist() == [10.0] * 4
    # a custom clamp
    assert kl_estimate(lp[:2], ref[:2], "k1", clamp=3.0).tolist() == [3.0, -3.0]
    assert kl_estimate(lp[:2], ref[:2], "k1", clamp=math.inf).tolist() == [20.0, -20.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_k3_extreme_finite_in_low_precision(dtype):
    lp = torch.tensor([-1e4, -60.0, 0.0, 60.0], dtype=dtype, requires_grad=True)
    ref = torch.zeros(4, dtype=dtype)
    k = kl_estimate(lp, ref, "k3")
    k.sum().backward()
    assert torch.isfinite(k).all() and torch.isfinite(lp.grad).all()
    assert k.tolist() == [10.0, 10.0, 0.0, 10.0]
    assert lp.grad.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_hand_worked_gradients():
    lp, ref = _lp([1.0, -1.0, 12.0])
    # dk/dδ: k1 -> 1; k2 -> δ; k3 -> 1 − e^{−δ}; zero where clamped (δ = 12: k1 = 12 > 10, k2 = 72, k3 ≈ 11)
    assert kl_estimate_grad(lp, ref, "k1").tolist() == [1.0, 1.0, 0.0]
    assert kl_estimate_grad(lp, ref, "k2").tolist() == [1.0, -1.0, 0.0]
    expected = torch.tensor([1 - math.exp(-1.0), 1 - math.e, 0.0], dtype=F64)
    torch.testing.assert_close(kl_estimate_grad(lp, ref, "k3"), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [10.0, 2.5, math.inf])
def test_grad_matches_autograd(kind, clamp):
    gen = torch.Generator().manual_seed(0)
    lp = (torch.rand(4, 50, generator=gen, dtype=F64) * 30 - 15).requires_grad_()
    ref = (torch.rand(4, 50, generator=gen, dtype=F64) * 4 - 2).requires_grad_()
    if clamp == math.inf and kind == "k3":  # keep e^{−δ} below the 80 cap of the safe-exp
        with torch.no_grad():
            lp.clamp_(min=-20.0)
    k = kl_estimate(lp, ref, kind, clamp)
    g_lp, g_ref = torch.autograd.grad(k.sum(), (lp, ref))
    expected = kl_estimate_grad(lp.detach(), ref.detach(), kind, clamp)
    torch.testing.assert_close(g_lp, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_ref, -expected, rtol=0, atol=1e-12)
    if clamp != math.inf:
        assert (expected == 0).any() and (expected != 0).any()  # both regimes covered


def test_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="valid names: k1, k2, k3"):
        kl_estimate(a, a, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_estimate(a, torch.zeros(3, 2), "k1")
    with pytest.raises(ValueError, match="clamp must be a positive number"):
        kl_estimate(a, a, "k1", clamp=0.0)
    with pytest.raises(TypeError, match="ref_log_probs must be a torch.Tensor"):
        kl_estimate(a, [0.0], "k1")
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
