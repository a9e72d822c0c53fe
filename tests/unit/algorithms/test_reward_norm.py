import json
import math

import pytest
import torch

from megatron_rpp.algorithms import RunningRewardNorm

F64 = torch.float64


def test_hand_worked_update_then_normalize():
    norm = RunningRewardNorm()
    norm.update(torch.tensor([1.0, 2.0, 3.0]))
    # mean 2, population var ((1)² + 0 + 1²)/3 = 2/3
    assert norm.count == 3 and norm.mean == pytest.approx(2.0) and norm.var == pytest.approx(2 / 3)
    norm.update(torch.tensor([5.0]))
    # all of 1, 2, 3, 5: mean 11/4 = 2.75; deviations −1.75, −0.75, 0.25, 2.25
    # squares 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75; var = 8.75/4 = 2.1875
    assert norm.mean == pytest.approx(2.75, abs=1e-15) and norm.var == pytest.approx(2.1875, abs=1e-15)
    out = norm.normalize(torch.tensor([5.0, 2.75], dtype=F64))
    assert out.tolist() == pytest.approx([2.25 / math.sqrt(2.1875), 0.0], abs=1e-15)
    # clip to ±1: 2.25/1.479 = 1.52 -> 1
    assert norm.normalize(torch.tensor([5.0]), clip=1.0).item() == 1.0
    # shift_mean=False only scales
    scale_only = RunningRewardNorm(shift_mean=False)
    scale_only.load_state_dict({"count": norm.count, "mean": norm.mean, "m2": norm.m2})
    assert scale_only.normalize(torch.tensor([5.0], dtype=F64)).item() == pytest.approx(5 / math.sqrt(2.1875))


def test_chan_merge_equals_one_shot():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen, dtype=F64) * 3 + 7
    norm = RunningRewardNorm()
    for chunk in x.split([1, 9, 90, 400, 500]):
        norm.update(chunk)
    assert norm.count == 1000
    assert abs(norm.mean - x.mean().item()) < 1e-12
    assert abs(norm.var - x.var(unbiased=False).item()) < 1e-12


def test_state_dict_roundtrip_plain_python():
    norm = RunningRewardNorm()
    norm.update(torch.tensor([1.0, 4.0, 2.0]))
    state = json.loads(json.dumps(norm.state_dict()))  # plain Python numbers only
    other = RunningRewardNorm()
    other.load_state_dict(state)
    assert (other.count, other.mean, other.m2) == (norm.count, norm.mean, norm.m2)
    other.update(torch.tensor([3.0]))
    norm.update(torch.tensor([3.0]))
    assert other.state_dict() == norm.state_dict()


def test_constant_rewards_no_nan_and_errors():
    norm = RunningRewardNorm()
    with pytest.raises(RuntimeError, match="before any update"):
        norm.normalize(torch.tensor([1.0]))
    norm.update(torch.full((4,), 3.0))
    assert norm.normalize(torch.full((4,), 3.0)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="finite"):
        norm.update(torch.tensor([float("nan")]))
    with pytest.raises(KeyError, match="missing"):
        norm.load_state_dict({"count": 1})
