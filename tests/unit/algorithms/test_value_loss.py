import math

import pytest
import torch

from megatron_rpp.algorithms import value_loss

F64 = torch.float64


def test_clipped_value_loss_hand_worked():
    # ε = 0.2, v_clip = old + clamp(v − old, ±0.2):
    #   v = 1.0, old = 0.5, R = 0: (v − R)² = 1; v_clip = 0.7 -> 0.49; ½·max = 0.5; grad (v − R) = 1
    #   v = 0.9, old = 0.0, R = 1: 0.01;         v_clip = 0.2 -> 0.64; ½·max = 0.32 (clipped, grad 0)
    #   v = 2.0, old = 2.0, R = 3: 1;            v_clip = 2.0 -> 1;    ½·1 = 0.5;  grad −1
    # token mean (0.5 + 0.32 + 0.5)/3 = 0.44; grads /3.
    values = torch.tensor([[1.0, 0.9, 2.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 2.0]], dtype=F64)
    returns = torch.tensor([[0.0, 1.0, 3.0]], dtype=F64)
    loss, m = value_loss(values, old, returns, torch.ones(1, 3))
    loss.backward()
    assert loss.item() == pytest.approx(0.44, abs=1e-12)
    assert m["value_clip_fraction"].item() == pytest.approx(1 / 3)
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, 0.0, -1 / 3]], dtype=F64), rtol=0, atol=1e-12)
    # unclipped: ½·(1 + 0.01 + 1)/3 = 0.335
    loss, _ = value_loss(values, old, returns, torch.ones(1, 3), clip_range=None)
    assert loss.item() == pytest.approx(0.335, abs=1e-12)


def test_mask_and_global_count():
    # second token masked (holds NaN): loss = ½(1 + 1)/global 4 = 0.25, zero grad there
    values = torch.tensor([[1.0, float("nan"), 2.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[1.0, float("nan"), 2.0]], dtype=F64)
    returns = torch.tensor([[0.0, float("nan"), 3.0]], dtype=F64)
    loss, _ = value_loss(values, old, returns, torch.tensor([[1, 0, 1]]), global_token_count=4)
    loss.backward()
    assert loss.item() == pytest.approx(0.25)
    assert values.grad[0, 1].item() == 0.0


def test_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"returns must have shape \[2, 3\]"):
        value_loss(x, x, torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_range must be None or a finite number > 0"):
        value_loss(x, x, x, torch.ones(2, 3), clip_range=0.0)


def test_explained_variance_hand_worked():
    from megatron_rpp.algorithms import explained_variance

    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the masked 99 never counts
    # values [1, 2, 2, 4]: errors [0, 0, 1, 0], mean 0.25, var (3·0.0625 + 0.5625)/4 = 0.1875;
    # Var(returns) = 1.25 -> 1 − 0.1875/1.25 = 0.85
    values = torch.tensor([[1.0, 2.0, 2.0, 4.0, -5.0]], dtype=F64)
    assert explained_variance(values, returns, mask) == pytest.approx(0.85, abs=1e-12)
    assert explained_variance(returns, returns, mask) == 1.0
    # a constant (any constant) explains nothing; a shifted copy explains everything
    assert explained_variance(torch.full_like(returns, 7.0), returns, mask) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(returns + 3.0, returns, mask) == pytest.approx(1.0, abs=1e-12)
    # worse than a constant: values [4, 3, 2, 1] -> errors [-3, -1, 1, 3], var 5 -> 1 − 5/1.25 = −3
    assert explained_variance(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]], dtype=F64), returns, mask) == pytest.approx(-3.0)
    # nothing to explain: constant returns, or no token
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))
    assert math.isnan(explained_variance(values, returns, torch.zeros_like(mask)))
