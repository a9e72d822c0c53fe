import pytest
import torch

from megatron_rpp.algorithms import aggregate

F64 = torch.float64
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_token_mean():
    # valid: 1, 2, 4 -> (1 + 2 + 4)/3 = 7/3; with a global count of 7: 7/7 = 1
    assert aggregate(LOSS, MASK, "token_mean").item() == pytest.approx(7 / 3, abs=1e-15)
    assert aggregate(LOSS, MASK, "token_mean", global_token_count=7).item() == pytest.approx(1.0, abs=1e-15)
    assert aggregate(LOSS, MASK, "token_mean", global_token_count=torch.tensor(14.0)).item() == pytest.approx(0.5)


def test_seq_mean_token_mean():
    # per-sequence token means: (1 + 2)/2 = 1.5 and 4/1 = 4 -> (1.5 + 4)/2 = 2.75; over 4 sequences: 1.375
    assert aggregate(LOSS, MASK, "seq_mean_token_mean").item() == pytest.approx(2.75, abs=1e-15)
    assert aggregate(LOSS, MASK, "seq_mean_token_mean", global_seq_count=4).item() == pytest.approx(1.375, abs=1e-15)


def test_seq_mean_token_sum_norm():
    # per-sequence sums 3 and 4 over T_norm = T = 3 -> (1 + 4/3)/2 = 7/6
    # with max_response_len = 4: (3/4 + 4/4)/2 = 0.875
    assert aggregate(LOSS, MASK, "seq_mean_token_sum_norm").item() == pytest.approx(7 / 6, abs=1e-15)
    got = aggregate(LOSS, MASK, "seq_mean_token_sum_norm", max_response_len=4).item()
    assert got == pytest.approx(0.875, abs=1e-15)


def test_empty_sequence_contributes_zero():
    # sequence 1 is empty: seq_mean_token_mean = (1.5 + 0)/2 = 0.75; token_mean = 3/2
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert aggregate(LOSS, mask, "seq_mean_token_mean").item() == pytest.approx(0.75, abs=1e-15)
    assert aggregate(LOSS, mask, "token_mean").item() == pytest.approx(1.5, abs=1e-15)
    # nothing valid at all: 0, not NaN
    assert aggregate(LOSS, torch.zeros(2, 3), "token_mean").item() == 0.0


def test_masked_garbage_never_reaches_result_or_grad():
    loss = LOSS.clone().masked_fill(MASK == 0, float("nan")).requires_grad_()
    out = aggregate(loss, MASK, "token_mean")
    out.backward()
    assert out.item() == pytest.approx(7 / 3)
    assert loss.grad.tolist() == [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_micro_batches_sum_to_full_batch(mode, splits):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 5, generator=gen, dtype=F64)
    mask = (torch.rand(8, 5, generator=gen) < 0.7).long()
    counts = dict(global_token_count=int(mask.sum()), global_seq_count=8, max_response_len=5)
    full = aggregate(loss, mask, mode, **counts)
    parts = sum(aggregate(l, m, mode, **counts) for l, m in zip(loss.chunk(splits), mask.chunk(splits)))
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="valid names: seq_mean_token_mean, seq_mean_token_sum_norm, token_mean"):
        aggregate(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match=r"mask must have shape \[2, 3\]"):
        aggregate(LOSS, torch.ones(2, 2), "token_mean")
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        aggregate(LOSS, MASK * 3, "token_mean")
    with pytest.raises(ValueError, match="global_token_count must be > 0"):
        aggregate(LOSS, MASK, "token_mean", global_token_count=0)
    with pytest.raises(ValueError, match=r"loss_mat must be \[B, T\]"):
        aggregate(LOSS.view(-1), MASK.view(-1), "token_mean")
