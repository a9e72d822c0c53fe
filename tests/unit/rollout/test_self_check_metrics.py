"""Rollout-vs-trainer log-prob gap metrics and the engine interface's value types."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_rpp.rollout.engine import RolloutEngine, SamplingConfig
from megatron_rpp.rollout.self_check import log_prob_gap_metrics, probe_sequences


def test_gap_metrics_by_hand():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    trainer = torch.tensor([[-1.0, -2.5, -2.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the last two tokens are padding
    m = log_prob_gap_metrics(rollout, trainer, mask)
    # δ = trainer − rollout on the 4 response tokens: 0, −0.5, +1, 0
    assert m["num_tokens"] == 4
    assert m["mean_abs_diff"] == pytest.approx(1.5 / 4)
    assert m["max_abs_diff"] == pytest.approx(1.0)
    # k3 = e^δ − 1 − δ: 0, e^−0.5 − 0.5, e − 2, 0
    assert m["kl"] == pytest.approx((math.exp(-0.5) - 0.5 + math.e - 2) / 4)


def test_gap_metrics_identical_and_empty():
    lp = torch.randn(3, 5)
    m = log_prob_gap_metrics(lp, lp.clone(), torch.ones(3, 5))
    assert m == {"mean_abs_diff": 0.0, "max_abs_diff": 0.0, "kl": 0.0, "num_tokens": 15}
    assert log_prob_gap_metrics(lp, lp, torch.zeros(3, 5))["num_tokens"] == 0


def test_gap_metrics_kl_is_kl_of_rollout_to_trainer():
    # Tokens sampled from the rollout distribution p: E_p[k3] = KL(p || q) exactly.
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    m = log_prob_gap_metrics(p.log()[tokens][None], q.log()[tokens][None], torch.ones(1, tokens.numel()))
    kl = float((p * (p / q).log()).sum())
    assert m["kl"] == pytest.approx(kl, rel=0.03)


def test_gap_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        log_prob_gap_metrics(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_probe_sequences_deterministic():
    a = probe_sequences(100, num=2, length=7, seed=3)
    assert a == probe_sequences(100, num=2, length=7, seed=3)
    assert len(a) == 2 and all(len(s) == 7 and all(0 <= t < 100 for t in s) for s in a)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"top_p": float("nan")}, "top_p"),
     ({"top_k": 2.5}, "top_k")],
)
def test_sampling_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}: must be"):
        SamplingConfig(**kwargs)


def test_sampling_config_and_protocol():
    s = SamplingConfig(stop_token_ids=[2, 3])
    assert s.stop_token_ids == (2, 3)

    class Fake:
        def generate(self, prompt_token_ids, sampling): return []
        def update_weights(self, named_tensors): pass
        def sleep(self): pass
        def wake_up(self, tags=None): pass
        def shutdown(self): pass

    assert isinstance(Fake(), RolloutEngine)
