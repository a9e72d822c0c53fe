import math
from collections import defaultdict

import pytest
import torch

from megatron_rpp.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageEstimator,
    compute_advantages,
    discounted_returns,
    gae,
    whiten,
)

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def assert_close(actual, expected, atol=1e-12):
    torch.testing.assert_close(actual, t64(expected) if not torch.is_tensor(expected) else expected, rtol=0, atol=atol)


# ------------------------------------------------------------------ hand-worked examples

# Two sequences; the second has 2 response tokens (its third position is padding).
KL_REWARDS = t64([1.0, -0.5])
KL_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
KL_TOKEN = t64([[0.2, 0.4, 0.6], [1.0, 0.2, 9.9]])  # 9.9 sits on padding: ignored


def test_reinforce_pp_token_rewards_and_returns_gamma_1():
    # kl_coef = 0.5: R0 = [−0.1, −0.2, −0.3 + 1.0] = [−0.1, −0.2, 0.7]  -> G0 = [0.4, 0.5, 0.7]
    #                R1 = [−0.5, −0.1 + (−0.5), 0] = [−0.5, −0.6, 0]     -> G1 = [−1.1, −0.6, 0]
    cfg = AdvantageConfig("reinforce_pp", kl_coef=0.5, whiten="none")
    out = compute_advantages(KL_REWARDS, KL_MASK, cfg, token_kl=KL_TOKEN)
    assert_close(out.token_rewards, [[-0.1, -0.2, 0.7], [-0.5, -0.6, 0.0]])
    assert_close(out.returns, [[0.4, 0.5, 0.7], [-1.1, -0.6, 0.0]])
    assert_close(out.advantages, out.returns)
    assert_close(out.shaped_rewards, [1.0, -0.5])


def test_reinforce_pp_gamma_half():
    # G0: t2 = 0.7; t1 = −0.2 + 0.5·0.7 = 0.15; t0 = −0.1 + 0.5·0.15 = −0.025
    # G1: t1 = −0.6; t0 = −0.5 + 0.5·(−0.6) = −0.8
    cfg = AdvantageConfig("reinforce_pp", kl_coef=0.5, gamma=0.5, whiten="none")
    adv, ret = compute_advantages(KL_REWARDS, KL_MASK, cfg, token_kl=KL_TOKEN)
    assert_close(ret, [[-0.025, 0.15, 0.7], [-0.8, -0.6, 0.0]])
    assert_close(adv, ret)


def test_reinforce_pp_default_global_whitening():
    # Returns on the 5 valid tokens: 0.4, 0.5, 0.7, −1.1, −0.6; μ = −0.1/5 = −0.02.
    # Deviations 0.42, 0.52, 0.72, −1.08, −0.58; squares sum 0.1764 + 0.2704 + 0.5184 + 1.1664
    # + 0.3364 = 2.468; var = 2.468/5 = 0.4936. A = deviation / sqrt(0.4936).
    cfg = AdvantageConfig(kl_coef=0.5)
    assert cfg.resolved_whiten() == "token"
    out = compute_advantages(KL_REWARDS, KL_MASK, cfg, token_kl=KL_TOKEN)
    s = math.sqrt(0.4936)
    assert_close(out.advantages, [[0.42 / s, 0.52 / s, 0.72 / s], [-1.08 / s, -0.58 / s, 0.0]])
    assert_close(out.returns, [[0.4, 0.5, 0.7], [-1.1, -0.6, 0.0]])  # returns are not whitened
    # mean-only: the deviations themselves
    mean_only = compute_advantages(KL_REWARDS, KL_MASK, AdvantageConfig(kl_coef=0.5, whiten="mean"), token_kl=KL_TOKEN)
    assert_close(mean_only.advantages, [[0.42, 0.52, 0.72], [-1.08, -0.58, 0.0]])


# Uneven, non-contiguous groups: group 7 = sequences 0-2 (rewards 1, 0, 0), group 2 =
# sequences 3-4 (rewards 3, 1). Sequence 4 has an empty response: its reward still counts
# in group 2's statistics, but it has no token to carry an advantage.
G_REWARDS = t64([1.0, 0.0, 0.0, 3.0, 1.0])
G_INDEX = torch.tensor([7, 7, 7, 2, 2])
G_MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [0, 0]])
# group 7: mean 1/3, unbiased var ((2/3)² + 2·(1/3)²)/2 = 1/3, std 1/√3
# group 2: mean 2, unbiased var (1 + 1)/1 = 2, std √2


def _group(estimator, **kw):
    return compute_advantages(G_REWARDS, G_MASK, AdvantageConfig(estimator, **kw), group_index=G_INDEX)


def _on_tokens(per_seq):
    # broadcast a per-sequence value over its valid tokens (γ = 1, no KL)
    return t64(per_seq).unsqueeze(1) * G_MASK.to(F64)


@pytest.mark.parametrize("estimator", ["reinforce_pp_baseline", "dr_grpo"])
def test_group_mean_baseline(estimator):
    # r − group mean: 1 − 1/3, 0 − 1/3, 0 − 1/3, 3 − 2, 1 − 2
    shaped = [2 / 3, -1 / 3, -1 / 3, 1.0, -1.0]
    out = _group(estimator, whiten="none")
    assert_close(out.shaped_rewards, shaped)
    assert_close(out.advantages, _on_tokens(shaped))


def test_reinforce_pp_baseline_default_whitening():
    # Valid token values: 2/3, 2/3, −1/3, −1/3, −1/3, 1 (sequence 4 has none); n = 6, μ = (4/3)/6 = 2/9.
    # Deviations 4/9 (×2), −5/9 (×3), 7/9; squares sum (32 + 75 + 49)/81 = 156/81; var = 26/81.
    # Whitened: (4/9)/(√26/9) = 4/√26, −5/√26, 7/√26.
    out = _group("reinforce_pp_baseline")
    r = math.sqrt(26.0)
    assert_close(out.advantages, [[4 / r, 4 / r], [-5 / r, 0.0], [-5 / r, -5 / r], [7 / r, 0.0], [0.0, 0.0]])


def test_rloo():
    # r − mean of the others: 1 − 0, 0 − (1 + 0)/2, 0 − 1/2, 3 − 1, 1 − 3
    shaped = [1.0, -0.5, -0.5, 2.0, -2.0]
    out = _group("rloo")
    assert out.advantages.dtype == F64
    assert_close(out.shaped_rewards, shaped)
    assert_close(out.advantages, _on_tokens(shaped))  # default whiten: none


def test_grpo():
    # (r − mean)/(std + 1e-6): group 7 std 1/√3, group 2 std √2
    s7, s2 = 1 / math.sqrt(3) + 1e-6, math.sqrt(2) + 1e-6
    shaped = [(2 / 3) / s7, (-1 / 3) / s7, (-1 / 3) / s7, 1 / s2, -1 / s2]
    out = _group("grpo")
    assert_close(out.shaped_rewards, shaped)
    assert_close(out.advantages, _on_tokens(shaped))
    # a custom eps
    out = _group("grpo", grpo_eps=0.1)
    assert_close(out.shaped_rewards[3:], [1 / (math.sqrt(2) + 0.1), -1 / (math.sqrt(2) + 0.1)])


def test_reward_clip():
    # shaped rewards 25, −30, 3 are clipped to ±10 before they become token rewards
    mask = torch.ones(3, 1)
    out = compute_advantages(t64([25.0, -30.0, 3.0]), mask, AdvantageConfig(whiten="none"))
    assert_close(out.shaped_rewards, [10.0, -10.0, 3.0])
    assert_close(out.advantages, [[10.0], [-10.0], [3.0]])
    out = compute_advantages(t64([25.0, -30.0, 3.0]), mask, AdvantageConfig(whiten="none", reward_clip=2.0))
    assert_close(out.advantages, [[2.0], [-2.0], [2.0]])


def test_gae_hand_worked_with_hole():
    # γ = 0.9, λ = 0.8, γλ = 0.72, R = reward 1 on the last response token.
    # Sequence 0, V = [0.5, 0.4, 0.3]:
    #   t2: δ = 1 − 0.3 = 0.7;                  A2 = 0.7
    #   t1: δ = 0.9·0.3 − 0.4 = −0.13;          A1 = −0.13 + 0.72·0.7 = 0.374
    #   t0: δ = 0.9·0.4 − 0.5 = −0.14;          A0 = −0.14 + 0.72·0.374 = 0.12928
    # Sequence 1, mask [1, 0, 1] (t1 is skipped; its value 99 is never read):
    #   t2: A2 = 0.7;  t0: δ = 0.9·0.3 − 0.5 = −0.23;  A0 = −0.23 + 0.72·0.7 = 0.274
    # returns = A + V on response tokens.
    values = t64([[0.5, 0.4, 0.3], [0.5, 99.0, 0.3]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    cfg = AdvantageConfig("gae", gamma=0.9, lam=0.8, whiten="none")
    out = compute_advantages(t64([1.0, 1.0]), mask, cfg, values=values)
    assert_close(out.advantages, [[0.12928, 0.374, 0.7], [0.274, 0.0, 0.7]])
    assert_close(out.returns, [[0.62928, 0.774, 1.0], [0.774, 0.0, 1.0]])
    # default whitening for gae is "token"; returns are computed before it
    whitened = compute_advantages(t64([1.0, 1.0]), mask, AdvantageConfig("gae", gamma=0.9, lam=0.8), values=values)
    assert_close(whitened.returns, out.returns)
    assert_close(whitened.advantages, whiten(out.advantages, mask))


def test_gae_lambda_one_gamma_one_is_returns_minus_values():
    # λ = γ = 1: A_t = G_t − V_t (telescoping)
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    tok = torch.randn(2, 4, generator=gen, dtype=F64)
    values = torch.randn(2, 4, generator=gen, dtype=F64)
    adv, ret = gae(tok, values, mask, gamma=1.0, lam=1.0)
    assert_close(adv, (discounted_returns(tok, mask, 1.0) - values) * mask)
    assert_close(ret, discounted_returns(tok, mask, 1.0))


def test_discounted_returns_skip_holes():
    # mask [1, 0, 1, 1], γ = 0.5: t3 = 4; t2 = 2 + 0.5·4 = 4; t1 masked -> 0; t0 = 1 + 0.5·4 = 3
    out = discounted_returns(t64([[1.0, 5.0, 2.0, 4.0]]), torch.tensor([[1, 0, 1, 1]]), 0.5)
    assert_close(out, [[3.0, 0.0, 4.0, 4.0]])


def test_last_token_is_last_mask_one():
    # the reward lands on the last position where the mask is 1, even after a hole
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    out = compute_advantages(t64([2.0]), mask, AdvantageConfig(whiten="none"))
    assert_close(out.token_rewards, [[0.0, 0.0, 0.0, 2.0, 0.0]])
    assert_close(out.returns, [[2.0, 2.0, 0.0, 2.0, 0.0]])


# ------------------------------------------------------------------ loop reference


def ref_advantages(rewards, mask, group_index, token_kl, values, cfg):
    """Plain-Python implementation of docs/algorithms.md, one sequence and token at a time."""
    B, T = len(mask), len(mask[0])
    groups = defaultdict(list)
    for b in range(B):
        groups[group_index[b]].append(b)
    shaped = []
    for b in range(B):
        members = groups[group_index[b]]
        others = [rewards[i] for i in members if i != b]
        mean = sum(rewards[i] for i in members) / len(members)
        std = math.sqrt(sum((rewards[i] - mean) ** 2 for i in members) / (len(members) - 1))
        shaped.append({
            "reinforce_pp": rewards[b],
            "gae": rewards[b],
            "reinforce_pp_baseline": rewards[b] - mean,
            "dr_grpo": rewards[b] - mean,
            "rloo": rewards[b] - sum(others) / max(len(others), 1),
            "grpo": (rewards[b] - mean) / (std + cfg.grpo_eps),
        }[cfg.estimator])
    shaped = [min(max(s, -cfg.reward_clip), cfg.reward_clip) for s in shaped]
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b][t]]
        r = {t: -cfg.kl_coef * token_kl[b][t] for t in valid}
        if valid:
            r[valid[-1]] += shaped[b]
        g, a, next_v = 0.0, 0.0, 0.0
        for t in reversed(valid):
            if cfg.estimator == "gae":
                delta = r[t] + cfg.gamma * next_v - values[b][t]
                a = delta + cfg.gamma * cfg.lam * a
                next_v = values[b][t]
                adv[b][t], ret[b][t] = a, a + values[b][t]
            else:
                g = r[t] + cfg.gamma * g
                adv[b][t] = ret[b][t] = g
    mode = cfg.resolved_whiten()
    flat = [adv[b][t] for b in range(B) for t in range(T) if mask[b][t]]
    if mode != "none" and flat:
        mu = sum(flat) / len(flat)
        var = sum((x - mu) ** 2 for x in flat) / len(flat)
        scale = 1 / math.sqrt(max(var, 1e-8)) if mode == "token" else 1.0
        adv = [[(adv[b][t] - mu) * scale if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret, shaped


def random_batch(seed, B=14, T=7):
    gen = torch.Generator().manual_seed(seed)
    sizes, total = [], 0
    while total < B:  # uneven groups of 2..5, the last one absorbing the remainder
        n = int(torch.randint(2, 6, (1,), generator=gen))
        n = B - total if B - total - n < 2 else n
        sizes.append(n)
        total += n
    ids = torch.randperm(100, generator=gen)[: len(sizes)]
    group_index = torch.cat([ids[i].repeat(n) for i, n in enumerate(sizes)])
    mask = (torch.rand(B, T, generator=gen) < 0.75).long()  # ragged, with holes
    mask[0] = 0  # an empty response
    mask[1, :] = 1  # a full one
    rewards = torch.randn(B, generator=gen, dtype=F64) * 3
    token_kl = torch.randn(B, T, generator=gen, dtype=F64).abs()
    values = torch.randn(B, T, generator=gen, dtype=F64)
    return rewards, mask, group_index, token_kl, values


CASES = [
    ("reinforce_pp", dict(kl_coef=0.1)),
    ("reinforce_pp", dict(kl_coef=0.05, gamma=0.9, whiten="mean")),
    ("reinforce_pp", dict(whiten="none", reward_clip=2.0)),
    ("reinforce_pp_baseline", dict(kl_coef=0.2)),
    ("reinforce_pp_baseline", dict(whiten="none")),
    ("grpo", dict()),
    ("grpo", dict(kl_coef=0.01, whiten="token")),
    ("dr_grpo", dict(kl_coef=0.01)),
    ("rloo", dict(reward_clip=1.5)),
    ("gae", dict(kl_coef=0.1, gamma=0.95, lam=0.9)),
    ("gae", dict(whiten="none", gamma=1.0, lam=1.0)),
]


@pytest.mark.parametrize("estimator,kw", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(estimator, kw, seed):
    rewards, mask, group_index, token_kl, values = random_batch(seed)
    cfg = AdvantageConfig(estimator=estimator, **kw)
    out = compute_advantages(rewards, mask, cfg, group_index=group_index, token_kl=token_kl, values=values)
    ref_adv, ref_ret, ref_shaped = ref_advantages(
        rewards.tolist(), mask.tolist(), group_index.tolist(), token_kl.tolist(), values.tolist(), cfg
    )
    assert_close(out.shaped_rewards, ref_shaped)
    assert_close(out.returns, ref_ret)
    assert_close(out.advantages, ref_adv)


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
def test_masked_positions_exactly_zero_even_with_garbage(estimator):
    rewards, mask, group_index, token_kl, values = random_batch(3)
    token_kl = token_kl.masked_fill(mask == 0, float("nan"))
    values = values.masked_fill(mask == 0, float("inf"))
    cfg = AdvantageConfig(estimator, kl_coef=0.1)
    out = compute_advantages(rewards, mask, cfg, group_index=group_index, token_kl=token_kl, values=values)
    for x in (out.advantages, out.returns, out.token_rewards):
        assert torch.isfinite(x).all()
        assert (x[mask == 0] == 0).all()
    assert (out.advantages[0] == 0).all()  # the empty response


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline", "gae", "grpo"])
def test_whitened_mean_zero_std_one(estimator):
    rewards, mask, group_index, token_kl, values = random_batch(4)
    cfg = AdvantageConfig(estimator, kl_coef=0.1, whiten="token")
    adv = compute_advantages(rewards, mask, cfg, group_index=group_index, token_kl=token_kl, values=values).advantages
    valid = adv[mask.bool()]
    assert abs(valid.mean().item()) < 1e-12
    assert abs(valid.std(unbiased=False).item() - 1.0) < 1e-12


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline", "grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("whiten_mode", ["token", "mean", "none"])
def test_all_equal_rewards_no_nan(estimator, whiten_mode):
    rewards = t64([0.5, 0.5, 0.5, 1.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [1, 1]])
    cfg = AdvantageConfig(estimator, whiten=whiten_mode)
    out = compute_advantages(rewards, mask, cfg, group_index=torch.tensor([0, 0, 0, 1, 1]))
    assert torch.isfinite(out.advantages).all()
    if estimator != "reinforce_pp":
        assert (out.advantages == 0).all()  # no signal in a group that agrees


def test_zero_variance_whitening_and_empty_batch():
    mask = torch.tensor([[1, 1], [1, 0]])
    out = compute_advantages(t64([2.0, 2.0]), mask, AdvantageConfig())
    assert (out.advantages == 0).all()  # (2 − 2)/sqrt(1e-8) = 0, not NaN
    empty = compute_advantages(t64([1.0, -1.0]), torch.zeros(2, 3), AdvantageConfig())
    assert (empty.advantages == 0).all() and (empty.returns == 0).all()
    assert_close(empty.shaped_rewards, [1.0, -1.0])


def test_float32_and_bool_mask():
    rewards, mask, group_index, token_kl, values = random_batch(5)
    cfg = AdvantageConfig("reinforce_pp_baseline", kl_coef=0.1)
    a64 = compute_advantages(rewards, mask, cfg, group_index=group_index, token_kl=token_kl).advantages
    a32 = compute_advantages(rewards.float(), mask.bool(), cfg, group_index=group_index, token_kl=token_kl.float())
    assert a32.advantages.dtype == torch.float32
    torch.testing.assert_close(a32.advantages, a64.float(), rtol=1e-5, atol=1e-5)


def test_no_autograd_graph():
    rewards = t64([1.0, 2.0]).requires_grad_()
    out = compute_advantages(rewards, torch.ones(2, 2), AdvantageConfig())
    assert not out.advantages.requires_grad


def test_plugin_estimator_from_file(tmp_path):
    f = tmp_path / "my_est.py"
    f.write_text("def doubled(rewards, group_index, cfg):\n    return 2 * rewards\n")
    out = compute_advantages(t64([1.0, -2.0]), torch.ones(2, 1), AdvantageConfig(f"{f}:doubled", whiten="none"))
    assert_close(out.advantages, [[2.0], [-4.0]])


def test_register_custom_estimator():
    name = "test_custom_median_baseline"
    spec = AdvantageEstimator(
        shape_rewards=lambda r, g, cfg: r - r.median(),
        token_advantages=ADVANTAGE_ESTIMATORS.get("reinforce_pp").token_advantages,
        default_whiten="none",
    )
    ADVANTAGE_ESTIMATORS.register(name, spec)
    try:
        cfg = AdvantageConfig(name)
        assert cfg.resolved_whiten() == "none"
        out = compute_advantages(t64([1.0, 5.0, 2.0]), torch.ones(3, 1), cfg)
        assert_close(out.advantages, [[-1.0], [3.0], [0.0]])
    finally:
        ADVANTAGE_ESTIMATORS.unregister(name)


def test_default_whitening_per_estimator():
    expected = {"reinforce_pp": "token", "reinforce_pp_baseline": "token", "gae": "token",
                "grpo": "none", "dr_grpo": "none", "rloo": "none"}
    assert {e: AdvantageConfig(e).resolved_whiten() for e in expected} == expected
    assert AdvantageConfig("grpo", whiten=True).resolved_whiten() == "token"
    assert AdvantageConfig("gae", whiten=False).resolved_whiten() == "none"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(estimator="nope"),
            "AdvantageConfig.estimator: unknown advantage estimator 'nope'; "
            "valid names: dr_grpo, gae, grpo, reinforce_pp, reinforce_pp_baseline, rloo",
        ),
        (dict(gamma=0.0), r"AdvantageConfig.gamma: must be a number in \(0, 1\], got 0.0"),
        (dict(gamma=1.5), r"AdvantageConfig.gamma: must be a number in \(0, 1\], got 1.5"),
        (dict(gamma=float("nan")), r"AdvantageConfig.gamma: must be a number in \(0, 1\], got nan"),
        (dict(lam=-0.1), r"AdvantageConfig.lam: must be a number in \[0, 1\]"),
        (dict(kl_coef=-1.0), "AdvantageConfig.kl_coef: must be a finite number >= 0"),
        (dict(kl_coef=math.inf), "AdvantageConfig.kl_coef: must be a finite number >= 0"),
        (dict(reward_clip=0.0), r"AdvantageConfig.reward_clip: must be a number > 0 \(inf allowed\)"),
        (dict(grpo_eps=0.0), "AdvantageConfig.grpo_eps: must be a finite number > 0"),
        (dict(whiten="batch"), r"AdvantageConfig.whiten: must be one of \['token', 'mean', 'none'\]"),
        (dict(estimator="grpo", gamma=0.99), "AdvantageConfig.gamma: must be 1.0 for the group estimator 'grpo'"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        AdvantageConfig(**kw)


def test_input_errors():
    r, m, cfg = t64([1.0, 2.0]), torch.ones(2, 3), AdvantageConfig()
    with pytest.raises(ValueError, match=r"response_mask must have shape \[B=2, T\]"):
        compute_advantages(r, torch.ones(3, 3), cfg)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\]"):
        compute_advantages(r.view(2, 1), m, cfg)
    with pytest.raises(ValueError, match="response_mask must contain only 0 and 1"):
        compute_advantages(r, m * 2, cfg)
    with pytest.raises(ValueError, match="response_mask must contain only 0 and 1"):
        compute_advantages(r, m * 0.5, cfg)
    with pytest.raises(ValueError, match="response_mask must have 2 dimensions"):
        compute_advantages(r, torch.ones(2), cfg)
    with pytest.raises(ValueError, match=r"token_kl must have shape \[2, 3\]"):
        compute_advantages(r, m, AdvantageConfig(kl_coef=0.1), token_kl=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kl_coef=0.1 needs token_kl"):
        compute_advantages(r, m, AdvantageConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="'grpo' needs group_index"):
        compute_advantages(r, m, AdvantageConfig("grpo"))
    with pytest.raises(ValueError, match="groups of one: \\[5\\]"):
        compute_advantages(t64([1.0, 2.0, 3.0]), torch.ones(3, 1), AdvantageConfig("rloo"),
                           group_index=torch.tensor([4, 4, 5]))
    with pytest.raises(TypeError, match="group_index must be an integer tensor"):
        compute_advantages(r, m, AdvantageConfig("grpo"), group_index=torch.zeros(2))
    with pytest.raises(ValueError, match="'gae' needs values"):
        compute_advantages(r, m, AdvantageConfig("gae"))
    with pytest.raises(ValueError, match=r"values must have shape \[2, 3\]"):
        compute_advantages(r, m, AdvantageConfig("gae"), values=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="cfg must be an AdvantageConfig"):
        compute_advantages(r, m, {"gamma": 0.9})


def test_keyword_cfg_style():
    r, m = t64([1.0, 3.0]), torch.ones(2, 2)
    a = compute_advantages(rewards=r, response_mask=m, cfg=AdvantageConfig(whiten="none"))
    b = compute_advantages(r, m, AdvantageConfig(whiten="none"))
    assert torch.equal(a.advantages, b.advantages)
    assert_close(a.advantages, [[1.0, 1.0], [3.0, 3.0]])
