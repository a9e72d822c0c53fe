"""The controller's PPO wiring, against values worked out by hand: the critic's values reach GAE
through ``phases.advantages`` (with the token KL in the reward), ``phases.critic_metrics`` reports
their explained variance, ``phases.policy_trains`` holds the policy during the critic's warm-up,
and ``value_head`` reads V(s_t) from the position before response token t."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.config import load_config
from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.models.critic import value_head
from megatron_rpp.trainer import phases


def _batch() -> RolloutBatch:
    """Sequence 0: prompt 2 tokens, response 3; sequence 1: prompt 4 tokens, response 1."""
    batch = RolloutBatch.from_sequences([[5, 6], [7, 8, 9, 10]], [[11, 12, 13], [14]])
    mask = batch.response_mask
    delta = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.0, 0.0]])  # log π_old − log π_ref
    ref = torch.full(mask.shape, -1.0) * mask
    return batch.replace(rewards=torch.tensor([1.0, 0.0]), old_log_probs=(ref + delta) * mask, ref_log_probs=ref,
                         values=torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.0, 0.0]]))


def test_gae_advantages_and_returns_hand_worked():
    cfg = load_config(None, ["algorithm.estimator=gae", "algorithm.gamma=0.9", "algorithm.lam=0.8",
                             "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1", "algorithm.whiten=none"])
    batch, out, token_kl = phases.advantages(cfg, _batch())
    # token rewards R = −0.1·δ, + the reward on the last token:
    #   seq 0: [−0.05, 0.02, −0.01 + 1] = [−0.05, 0.02, 0.99]; seq 1: [−0.03]
    # seq 0, V = [0.2, 0.4, 0.6], γλ = 0.72:
    #   t=2: δ = 0.99 − 0.6 = 0.39                      A = 0.39
    #   t=1: δ = 0.02 + 0.9·0.6 − 0.4 = 0.16            A = 0.16 + 0.72·0.39 = 0.4408
    #   t=0: δ = −0.05 + 0.9·0.4 − 0.2 = 0.11           A = 0.11 + 0.72·0.4408 = 0.427376
    #   returns = A + V = [0.627376, 0.8408, 0.99]
    # seq 1, V = [0.5]: A = −0.03 − 0.5 = −0.53, returns = −0.03
    expected_adv = torch.tensor([[0.427376, 0.4408, 0.39], [-0.53, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.627376, 0.8408, 0.99], [-0.03, 0.0, 0.0]])
    torch.testing.assert_close(token_kl, torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.0, 0.0]]))
    torch.testing.assert_close(batch.advantages, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.returns, expected_ret, atol=1e-6, rtol=0)
    # default whitening of gae ("token"): over the 4 response tokens; returns are not whitened
    cfg = load_config(None, ["algorithm.estimator=gae", "algorithm.gamma=0.9", "algorithm.lam=0.8",
                             "algorithm.kl_coef=0.1"])
    batch, _, _ = phases.advantages(cfg, _batch())
    valid = expected_adv[batch.response_mask]
    whitened = (valid - valid.mean()) / valid.var(unbiased=False).sqrt()
    torch.testing.assert_close(batch.advantages[batch.response_mask], whitened, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.returns, expected_ret, atol=1e-6, rtol=0)


def test_values_are_ignored_by_estimators_without_them_and_required_by_gae():
    cfg = load_config(None, ["algorithm.estimator=reinforce_pp", "algorithm.kl_coef=0.1", "algorithm.whiten=none"])
    batch, _, _ = phases.advantages(cfg, _batch())
    # REINFORCE++: returns-to-go of R; seq 0 [−0.05 + 0.02 + 0.99, 0.02 + 0.99, 0.99] — no values anywhere
    torch.testing.assert_close(batch.advantages[0], torch.tensor([0.96, 1.01, 0.99]), atol=1e-6, rtol=0)
    cfg = load_config(None, ["algorithm.estimator=gae", "algorithm.kl_coef=0.1"])
    with pytest.raises(ValueError, match="'gae' needs values"):
        phases.advantages(cfg, _batch().replace(values=None))


def test_critic_metrics_explained_variance_hand_worked():
    batch = _batch()
    # returns on the 4 tokens [1, 2, 3, 4], values [1, 2, 2, 4]: EV = 1 − 0.1875/1.25 = 0.85 (test_value_loss)
    batch = batch.replace(returns=torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]),
                          values=torch.tensor([[1.0, 2.0, 2.0], [4.0, 0.0, 0.0]]))
    m = phases.critic_metrics(batch, {"critic/value_loss": 0.5, "critic/update_ok": True, "loss": 3.0})
    assert m["critic/explained_variance"] == pytest.approx(0.85, abs=1e-6)
    assert m["critic/values_mean"] == pytest.approx(9.0 / 4) and m["critic/returns_mean"] == pytest.approx(2.5)
    assert m["critic/returns_std"] == pytest.approx(1.25 ** 0.5, abs=1e-6)  # population std of [1, 2, 3, 4]
    assert m["critic/value_loss"] == 0.5 and "loss" not in m and "critic/update_ok" not in m


def test_policy_waits_for_the_critic_warmup_only_with_a_critic():
    cfg = load_config(None, ["algorithm.estimator=gae", "critic.warmup_steps=2", "trainer.steps=5"])
    assert [phases.policy_trains(cfg, s) for s in range(1, 6)] == [False, False, True, True, True]
    cfg = load_config(None, ["algorithm.estimator=reinforce_pp", "critic.warmup_steps=2", "trainer.steps=5"])
    assert all(phases.policy_trains(cfg, s) for s in range(1, 6))


def test_value_head_reads_the_position_before_each_response_token():
    batch = _batch()
    input_ids, resp_index = batch.model_inputs()
    # a fake critic output whose value at position s is s: V(s_t) must come from position p_b + t − 1
    output = torch.arange(input_ids.shape[1], dtype=torch.float32).expand(len(batch), -1)[..., None]  # [B, S, 1]
    values = value_head(output, batch, input_ids, resp_index)
    # seq 0: prompt 2 -> positions 1, 2, 3; seq 1: prompt 4 -> position 3, then padding (0)
    torch.testing.assert_close(values, torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]))
