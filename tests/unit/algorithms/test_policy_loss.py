import math

import pytest
import torch

from megatron_rpp.algorithms import POLICY_LOSSES, PolicyLossConfig, kl_estimate, policy_loss, ppo_clip_loss

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def _leaf(x):
    return t64(x).requires_grad_()


def test_ppo_clip_hand_worked():
    # ε = 0.2, one sequence of 4 tokens (ρ, A):
    #   (1.0, +1): −1·1 = −1 vs −1·1 = −1                 -> −1,  not clipped, dℓ/dlogp = −Aρ = −1
    #   (1.5, +1): −1.5 vs −1.2 -> max −1.2                -> clipped, grad 0
    #   (0.5, −1): 0.5 vs 0.8 -> max 0.8                   -> clipped, grad 0
    #   (1.1, −1): 1.1 vs 1.1                              -> 1.1, not clipped, dℓ/dlogp = −Aρ = 1.1
    # token mean: (−1 − 1.2 + 0.8 + 1.1)/4 = −0.075; clip fraction 2/4; grads /4.
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    log_probs = _leaf([[0.0, math.log(1.5), math.log(0.5), math.log(1.1)]])
    adv = t64([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = ppo_clip_loss(log_probs, old, adv, torch.ones(1, 4))
    loss.backward()
    assert loss.item() == pytest.approx(-0.075, abs=1e-12)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["dual_clip_fraction"].item() == 0.0
    torch.testing.assert_close(log_probs.grad, t64([[-0.25, 0.0, 0.0, 0.275]]), rtol=0, atol=1e-12)
    # approx_kl = mean of k3(old vs new) = mean(ρ − 1 − ln ρ)
    rho = [1.0, 1.5, 0.5, 1.1]
    expected_kl = sum(r - 1 - math.log(r) for r in rho) / 4
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-12)


def test_asymmetric_clip_higher():
    # clip_low 0.2, clip_high 0.28: ρ = 1.25, A = 1 is inside [0.8, 1.28] -> −1.25, not clipped
    # ρ = 1.5 -> −1.28; ρ = 0.7, A = −1 -> max(0.7, 0.8) = 0.8
    log_probs = t64([[math.log(1.25), math.log(1.5), math.log(0.7)]])
    loss, m = ppo_clip_loss(log_probs, torch.zeros(1, 3, dtype=F64), t64([[1.0, 1.0, -1.0]]), torch.ones(1, 3),
                            clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3, abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)


def test_dual_clip_hand_worked():
    # c = 3, ε = 0.2, tokens (ρ, A):
    #   (4, −2): max(8, 2.4) = 8 > cap 3·2 = 6 -> 6 (dual clip active, grad 0)
    #   (2, −2): max(4, 2.4) = 4 < 6          -> 4, grad −Aρ = 4
    #   (4, +1): max(−4, −1.2) = −1.2          -> dual clip does not apply to A > 0; clipped, grad 0
    # mean (6 + 4 − 1.2)/3 = 8.8/3; without dual clip (8 + 4 − 1.2)/3 = 10.8/3
    log_probs = _leaf([[math.log(4.0), math.log(2.0), math.log(4.0)]])
    old, adv, mask = torch.zeros(1, 3, dtype=F64), t64([[-2.0, -2.0, 1.0]]), torch.ones(1, 3)
    loss, m = ppo_clip_loss(log_probs, old, adv, mask, dual_clip=3.0)
    loss.backward()
    assert loss.item() == pytest.approx(8.8 / 3, abs=1e-12)
    assert m["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    assert m["clip_fraction"].item() == pytest.approx(1 / 3)
    torch.testing.assert_close(log_probs.grad, t64([[0.0, 4 / 3, 0.0]]), rtol=0, atol=1e-12)
    assert ppo_clip_loss(log_probs, old, adv, mask)[0].item() == pytest.approx(10.8 / 3, abs=1e-12)


def test_truncated_importance_sampling():
    # ρ = 1, A = 1 -> per-token loss −1. old − rollout = ln 2, ln 0.5, 0, ln 10 -> w = 2, 0.5, 1, 10,
    # truncated to [0.6, 5]: 2, 0.6, 1, 5. Loss mean(−w) = −8.6/4 = −2.15; dℓ/dlogp = −wAρ/4.
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    rollout = t64([[-math.log(2.0), -math.log(0.5), 0.0, -math.log(10.0)]])
    log_probs = _leaf([[0.0, 0.0, 0.0, 0.0]])
    cfg = PolicyLossConfig(tis_low=0.6, tis_high=5.0)
    ones = torch.ones(1, 4, dtype=F64)
    loss, m = policy_loss(log_probs, old, ones, torch.ones(1, 4), cfg, rollout_log_probs=rollout)
    loss.backward()
    assert loss.item() == pytest.approx(-2.15, abs=1e-12)
    assert m["tis_weight"].item() == pytest.approx(2.15, abs=1e-12)
    torch.testing.assert_close(log_probs.grad, t64([[-0.5, -0.15, -0.25, -1.25]]), rtol=0, atol=1e-12)
    # no rollout log-probs, or TIS off: plain loss −1
    assert policy_loss(log_probs, old, torch.ones(1, 4, dtype=F64), torch.ones(1, 4), cfg).loss.item() == -1.0
    plain = policy_loss(log_probs, old, torch.ones(1, 4, dtype=F64), torch.ones(1, 4), rollout_log_probs=rollout)
    assert plain.loss.item() == -1.0 and "tis_weight" not in plain.metrics


def test_kl_loss_k2():
    # A = 0 so the PG term is 0. δ = log_probs − ref = [1, −2]; k2 = [0.5, 2]; mean 1.25; β = 0.1 -> 0.125.
    # d/dlogp = β·δ/2 (token mean over 2) = [0.05, −0.1]
    log_probs = _leaf([[1.0, -2.0]])
    cfg = PolicyLossConfig(kl_loss_coef=0.1)
    loss, m = policy_loss(log_probs, log_probs.detach(), torch.zeros(1, 2, dtype=F64), torch.ones(1, 2), cfg,
                          ref_log_probs=torch.zeros(1, 2, dtype=F64))
    loss.backward()
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    assert m["kl_loss"].item() == pytest.approx(1.25, abs=1e-12)
    torch.testing.assert_close(log_probs.grad, t64([[0.05, -0.1]]), rtol=0, atol=1e-12)


def test_kl_loss_precomputed_matches_ref_path():
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 5, generator=gen, dtype=F64)
    ref = torch.randn(3, 5, generator=gen, dtype=F64)
    mask = (torch.rand(3, 5, generator=gen) < 0.7).long()
    cfg = PolicyLossConfig(kl_loss_coef=0.3, kl_loss_estimator="k3")
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    adv = torch.randn(3, 5, generator=gen, dtype=F64)
    la = policy_loss(a, lp, adv, mask, cfg, ref_log_probs=ref).loss
    lb = policy_loss(b, lp, adv, mask, cfg, kl=kl_estimate(b, ref, "k3")).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_entropy_bonus():
    # A = 0; entropy [1, 2]; coef 0.01 -> loss −0.01·1.5 = −0.015, d/dentropy = −0.01/2
    entropy = _leaf([[1.0, 2.0]])
    lp = torch.zeros(1, 2, dtype=F64)
    loss, m = policy_loss(lp, lp, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2), PolicyLossConfig(entropy_coef=0.01),
                          entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx(-0.015, abs=1e-15)
    assert m["entropy"].item() == pytest.approx(1.5)
    torch.testing.assert_close(entropy.grad, t64([[-0.005, -0.005]]), rtol=0, atol=1e-15)


def test_aggregation_modes_in_policy_loss():
    # ρ = 1, A = [[1, 2, x], [3, x, x]] -> per-token loss −A.
    # token_mean: −6/3 = −2; seq_mean_token_mean: (−1.5 − 3)/2 = −2.25;
    # seq_mean_token_sum_norm: (−3/3 − 3/3)/2 = −1
    lp = torch.zeros(2, 3, dtype=F64)
    adv = t64([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for mode, expected in [("token_mean", -2.0), ("seq_mean_token_mean", -2.25), ("seq_mean_token_sum_norm", -1.0)]:
        loss = policy_loss(lp, lp, adv, mask, PolicyLossConfig(agg_mode=mode)).loss
        assert loss.item() == pytest.approx(expected, abs=1e-15), mode


def _random(seed, B=8, T=6):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=gen, dtype=F64) - 2
    log_probs = old + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, T, generator=gen, dtype=F64)
    mask = (torch.rand(B, T, generator=gen) < 0.7).long()
    mask[0] = 0
    ref = old + 0.1 * torch.randn(B, T, generator=gen, dtype=F64)
    entropy = torch.rand(B, T, generator=gen, dtype=F64)
    rollout = old + 0.2 * torch.randn(B, T, generator=gen, dtype=F64)
    return log_probs, old, adv, mask, ref, entropy, rollout


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_split_invariance(mode):
    log_probs, old, adv, mask, ref, entropy, rollout = _random(0)
    cfg = PolicyLossConfig(dual_clip=3.0, kl_loss_coef=0.1, entropy_coef=0.01, tis_high=2.0, agg_mode=mode)
    counts = dict(global_token_count=int(mask.sum()), global_seq_count=mask.shape[0], max_response_len=6)
    results = []
    for splits in (1, 2, 4):
        lp = log_probs.clone().requires_grad_()
        total = 0.0
        for idx in torch.arange(8).chunk(splits):
            out = policy_loss(lp[idx], old[idx], adv[idx], mask[idx], cfg, ref_log_probs=ref[idx],
                              entropy=entropy[idx], rollout_log_probs=rollout[idx], **counts)
            out.loss.backward()
            total = total + out.loss.detach()
        results.append((total, lp.grad))
    for total, grad in results[1:]:
        torch.testing.assert_close(total, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-12)


def test_masked_tokens_zero_gradient_even_with_garbage():
    log_probs, old, adv, mask, ref, entropy, rollout = _random(1)
    bad = mask == 0
    log_probs = log_probs.masked_fill(bad, float("-inf")).requires_grad_()
    entropy = entropy.masked_fill(bad, float("nan")).requires_grad_()
    cfg = PolicyLossConfig(dual_clip=2.0, kl_loss_coef=0.1, entropy_coef=0.01, tis_high=2.0)
    loss, metrics = policy_loss(log_probs, old.masked_fill(bad, float("nan")), adv.masked_fill(bad, float("inf")),
                                mask, cfg, ref_log_probs=ref.masked_fill(bad, float("nan")), entropy=entropy,
                                rollout_log_probs=rollout.masked_fill(bad, float("nan")))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert (log_probs.grad[bad] == 0).all() and (entropy.grad[bad] == 0).all()
    assert torch.isfinite(log_probs.grad).all() and (log_probs.grad[~bad] != 0).any()


def test_clip_and_dual_clip_bounds():
    gen = torch.Generator().manual_seed(2)
    old = torch.zeros(64, 32, dtype=F64)
    log_probs = (3 * torch.randn(64, 32, generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(64, 32, generator=gen, dtype=F64)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    token_loss, _ = POLICY_LOSSES.get("ppo_clip")(log_probs, old, adv, cfg)
    pos, neg = adv > 0, adv < 0
    # A > 0: ℓ = −A·min(ρ, clip(ρ)) ≥ −(1 + ε_high)·A
    assert (token_loss[pos] >= -(1 + 0.28) * adv[pos] - 1e-12).all()
    # A < 0: (1 − ε_low)|A| ≤ ℓ ≤ c·|A|
    assert (token_loss[neg] <= 3.0 * adv[neg].abs() + 1e-12).all()
    assert (token_loss[neg] >= 0.8 * adv[neg].abs() - 1e-12).all()
    # where ρ is outside the trust region in the direction the advantage pushes, no gradient
    token_loss.sum().backward()
    rho = log_probs.detach().exp()
    assert (log_probs.grad[pos & (rho > 1.28)] == 0).all()
    assert (log_probs.grad[neg & (rho < 0.8)] == 0).all()
    assert (log_probs.grad[neg & (rho > 3.0)] == 0).all()  # dual clip


def test_extreme_log_ratio_is_clamped():
    # log ratio 50 -> clamped to 20: ρ = e^20, A = −1, no dual clip: loss = e^20 (finite)
    lp = t64([[50.0]])
    loss, _ = ppo_clip_loss(lp, torch.zeros(1, 1, dtype=F64), t64([[-1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-12)


def test_register_custom_policy_loss():
    @POLICY_LOSSES.register("test_vanilla_pg")
    def vanilla(log_probs, old_log_probs, advantages, cfg):
        return -advantages * log_probs, {}

    try:
        lp = t64([[1.0, 2.0]])
        loss = policy_loss(lp, lp, t64([[1.0, 1.0]]), torch.ones(1, 2), PolicyLossConfig(loss="test_vanilla_pg")).loss
        assert loss.item() == pytest.approx(-1.5)
    finally:
        POLICY_LOSSES.unregister("test_vanilla_pg")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss="ppo"), "PolicyLossConfig.loss: unknown policy loss 'ppo'; valid names: ppo_clip"),
        (dict(kl_loss_estimator="k9"), "PolicyLossConfig.kl_loss_estimator: .*valid names: k1, k2, k3"),
        (dict(agg_mode="mean"), "PolicyLossConfig.agg_mode: .*valid names: seq_mean_token_mean"),
        (dict(clip_low=-0.1), r"PolicyLossConfig.clip_low: must be a number in \[0, 1\), got -0.1"),
        (dict(clip_low=1.0), r"PolicyLossConfig.clip_low: must be a number in \[0, 1\), got 1.0"),
        (dict(clip_high=float("nan")), "PolicyLossConfig.clip_high: must be a finite number >= 0, got nan"),
        (dict(dual_clip=1.0), "PolicyLossConfig.dual_clip: must be None or a finite number > 1"),
        (dict(tis_high=0.0), "PolicyLossConfig.tis_high"),
        (dict(tis_low=0.5), "PolicyLossConfig.tis_low: must be None, or <= tis_high"),
        (dict(tis_low=3.0, tis_high=2.0), "PolicyLossConfig.tis_low"),
        (dict(entropy_coef=-1.0), "PolicyLossConfig.entropy_coef"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kw)


def test_input_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"old_log_probs must have shape \[2, 3\]"):
        policy_loss(x, torch.zeros(2, 4), x, m)
    with pytest.raises(ValueError, match="response_mask must contain only 0 and 1"):
        policy_loss(x, x, x, m - 0.5)
    with pytest.raises(ValueError, match=r"entropy must have shape"):
        policy_loss(x, x, x, m, entropy=torch.zeros(3))
    with pytest.raises(ValueError, match="kl_loss_coef > 0 needs ref_log_probs or kl"):
        policy_loss(x, x, x, m, PolicyLossConfig(kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="entropy_coef > 0 needs entropy"):
        policy_loss(x, x, x, m, PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        policy_loss(x, x, torch.zeros(2, 3, dtype=torch.long), m)
    with pytest.raises(ValueError, match="global_token_count must be > 0"):
        policy_loss(x, x, x, m, global_token_count=0)


def test_metric_keys():
    log_probs, old, adv, mask, ref, entropy, rollout = _random(3)
    cfg = PolicyLossConfig(dual_clip=3.0, tis_high=2.0)
    _, metrics = policy_loss(log_probs, old, adv, mask, cfg, ref_log_probs=ref, entropy=entropy,
                             rollout_log_probs=rollout)
    assert set(metrics) == {"pg_loss", "clip_fraction", "dual_clip_fraction", "approx_kl", "kl_loss", "entropy",
                            "tis_weight"}
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    _, metrics = policy_loss(log_probs, old, adv, mask)
    assert set(metrics) == {"pg_loss", "clip_fraction", "dual_clip_fraction", "approx_kl"}
