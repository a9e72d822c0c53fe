"""Advantage estimators: REINFORCE++ and the baselines it is compared with.

Shape letters: B sequences in the rollout batch, T response tokens (padded),
G number of groups (prompts; the samples of one prompt share a ``group_index``).

Pipeline (all estimators; the registry entry supplies steps 1 and 4 and the default of 5):

1. shaped sequence reward r̃ [B] from the rewards r [B]:
   ``reinforce_pp`` / ``gae``: r;  ``reinforce_pp_baseline`` / ``dr_grpo``: r − group mean;
   ``rloo``: r − mean of the *other* members of the group;
   ``grpo``: (r − group mean) / (group std + grpo_eps), std unbiased (n − 1).
2. clip r̃ to [−reward_clip, reward_clip].
3. token rewards R[b, t] = −kl_coef · token_kl[b, t] on response tokens, plus r̃[b] on the
   last response token of b (the last position where the mask is 1).
4. ``gae``: generalised advantage estimation with ``values``; returns = advantages + values.
   Others: returns G_t = Σ_{s≥t} γ^{s−t} R_s and advantages = returns.
5. whitening over every response token of the batch: "token" (A − μ)/sqrt(max(var, 1e-8)),
   "mean" (A − μ), or "none". Default "token" for reinforce_pp, reinforce_pp_baseline and
   gae, "none" for grpo, dr_grpo and rloo.

Edge cases: masked positions of advantages/returns are exactly 0. Positions where the
mask is 0 *inside* a response (e.g. tool output) are skipped: discounting and GAE run over
response tokens only. A sequence with an empty response (all-zero mask) has all-zero
advantages and returns; its reward still counts in its group's statistics. A group whose
rewards are all equal gets r̃ = 0 (grpo: 0 / (0 + eps) = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import (
    HyperparameterError,
    accepts_positional,
    check_mask,
    check_range,
    check_shape,
    check_tensor,
)
from megatron_rpp.algorithms.registry import Registry, RegistryError, UnknownNameError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "WHITEN_MODES",
    "AdvantageConfig",
    "AdvantageEstimator",
    "AdvantageOutput",
    "center",
    "compute_advantages",
    "discounted_returns",
    "gae",
    "group_moments",
    "token_rewards_from",
    "whiten",
]

WHITEN_MODES = ("token", "mean", "none")
_VAR_FLOOR = 1e-8

ShapeRewardsFn = Callable[[Tensor, Optional[Tensor], "AdvantageConfig"], Tensor]
TokenAdvantagesFn = Callable[[Tensor, Tensor, Optional[Tensor], "AdvantageConfig"], "tuple[Tensor, Tensor]"]


# ----------------------------------------------------------------------------- low-level math


def group_moments(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Size, mean and unbiased std of each sequence's group, broadcast back to sequences.

    Groups may have different sizes; ids need not be contiguous. A group of one is an error.

    Shape:
        rewards: [B] float; group_index: [B] integer; returns three [B] tensors.
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # [G]
    if bool((counts < 2).any()):
        lonely = torch.unique(group_index)[counts < 2].tolist()
        raise ValueError(f"group estimators need at least 2 samples per group; groups of one: {lonely[:10]}")
    zeros = torch.zeros(counts.shape[0], dtype=rewards.dtype, device=rewards.device)
    n = counts.to(rewards.dtype)[inverse]  # [G] -> [B]
    mean = zeros.index_add(0, inverse, rewards)[inverse] / n
    var = zeros.index_add(0, inverse, (rewards - mean).square())[inverse] / (n - 1)
    return n, mean, var.sqrt()


def token_rewards_from(
    shaped_rewards: Tensor, response_mask: Tensor, token_kl: Tensor | None, kl_coef: float
) -> Tensor:
    """R[b, t] = −kl_coef·token_kl[b, t]·m[b, t], plus r̃[b] at the last response token of b.

    Shape:
        shaped_rewards: [B]; response_mask: [B, T] bool; token_kl: [B, T] or None; returns [B, T].
    """
    mask = response_mask
    B, T = mask.shape
    zero = torch.zeros((), dtype=shaped_rewards.dtype, device=shaped_rewards.device)
    if token_kl is None or kl_coef == 0:
        out = torch.zeros(B, T, dtype=shaped_rewards.dtype, device=shaped_rewards.device)
    else:
        out = torch.where(mask, -kl_coef * token_kl.to(shaped_rewards.dtype), zero)
    has_tokens = mask.any(dim=-1)  # [B, T] -> [B]
    last = (T - 1) - mask.flip(-1).to(torch.int8).argmax(dim=-1)  # [B, T] -> [B]; T-1 if empty
    bonus = torch.where(has_tokens, shaped_rewards, zero)  # empty response: reward has no token
    return out.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{s≥t, m_s=1} γ^{(#response tokens from t to s) − 1} R_s on response tokens, 0 elsewhere.

    Masked positions are skipped (they neither receive nor discount reward).

    Shape:
        token_rewards: [B, T]; response_mask: [B, T]; returns [B, T].
    """
    mask = check_mask(response_mask)
    check_shape(token_rewards, mask.shape, "token_rewards", floating=True)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(mask, token_rewards, zero)
    if gamma == 1.0:
        out = rewards.flip(-1).cumsum(-1).flip(-1)  # suffix sums, same order as the recursion
        return torch.where(mask, out, zero)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # [B]
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return torch.where(mask, out, zero)


def gae(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    δ_t = R_t + γ V_next − V_t, A_t = δ_t + γλ A_next, where "next" is the next response
    token (V_next = A_next = 0 after the last one). Masked positions are skipped and set to 0.

    Shape:
        token_rewards, values, response_mask: [B, T]; returns two [B, T] tensors.
    """
    mask = check_mask(response_mask)
    check_shape(token_rewards, mask.shape, "token_rewards", floating=True)
    check_shape(values, mask.shape, "values", floating=True)
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    values = torch.where(mask, values.to(token_rewards.dtype), zero)
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])  # [B]
    next_adv = torch.zeros_like(next_value)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = torch.where(m, delta + gamma * lam * next_adv, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = next_adv
    advantages = torch.where(mask, advantages, zero)
    return advantages, torch.where(mask, advantages + values, zero)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − μ)/σ over the valid tokens of the whole tensor; σ² = max(masked var, 1e-8).

    μ and var are masked means (population variance). ``shift_mean=False`` keeps the mean:
    (x − μ)/σ + μ. Masked positions are exactly 0. No valid token: all zeros.

    Shape:
        values: [B, T]; mask: [B, T]; returns [B, T].
    """
    mask = check_mask(mask, "mask")
    check_shape(values, mask.shape, "values", floating=True)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    n = mask.sum().clamp(min=1)
    mean = torch.where(mask, values, zero).sum() / n
    centered = torch.where(mask, values - mean, zero)
    var = centered.square().sum() / n
    out = centered * torch.rsqrt(var.clamp(min=_VAR_FLOOR))
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, zero)


def center(values: Tensor, mask: Tensor) -> Tensor:
    """x − μ over the valid tokens (mean-only whitening); masked positions exactly 0.

    Shape:
        values: [B, T]; mask: [B, T]; returns [B, T].
    """
    mask = check_mask(mask, "mask")
    check_shape(values, mask.shape, "values", floating=True)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    mean = torch.where(mask, values, zero).sum() / mask.sum().clamp(min=1)
    return torch.where(mask, values - mean, zero)


# ----------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registry entry: how to shape sequence rewards and turn token rewards into advantages.

    Attributes:
        shape_rewards: (rewards [B], group_index [B] | None, cfg) -> shaped rewards [B].
        token_advantages: (token_rewards [B, T], mask [B, T] bool, values [B, T] | None, cfg)
            -> (advantages [B, T], returns [B, T]), before whitening.
        default_whiten: whitening used when ``AdvantageConfig.whiten`` is None.
        uses_groups: needs ``group_index``; γ must then be 1.
        needs_values: needs critic ``values``.
    """

    shape_rewards: ShapeRewardsFn
    token_advantages: TokenAdvantagesFn
    default_whiten: str = "token"
    uses_groups: bool = False
    needs_values: bool = False

    def __post_init__(self) -> None:
        if self.default_whiten not in WHITEN_MODES:
            raise ValueError(f"default_whiten must be one of {list(WHITEN_MODES)}, got {self.default_whiten!r}")
        for name, n_args in (("shape_rewards", 3), ("token_advantages", 4)):
            fn = getattr(self, name)
            if not callable(fn) or not accepts_positional(fn, n_args):
                raise RegistryError(
                    f"AdvantageEstimator.{name} must be a function of {n_args} positional arguments "
                    f"({'rewards, group_index, cfg' if n_args == 3 else 'token_rewards, mask, values, cfg'}), got {fn!r}"
                )


def identity_rewards(rewards: Tensor, group_index: Tensor | None, cfg: AdvantageConfig) -> Tensor:
    """r̃ = r (REINFORCE++, GAE). Shape: [B] -> [B]."""
    return rewards


def group_mean_baseline(rewards: Tensor, group_index: Tensor | None, cfg: AdvantageConfig) -> Tensor:
    """r̃ = r − group mean (REINFORCE++-baseline, Dr. GRPO). Shape: [B] -> [B]."""
    _, mean, _ = group_moments(rewards, _require_groups(group_index))
    return rewards - mean


def leave_one_out_baseline(rewards: Tensor, group_index: Tensor | None, cfg: AdvantageConfig) -> Tensor:
    """r̃ = r − mean of the other n − 1 members = n/(n − 1)·(r − mean) (RLOO). Shape: [B] -> [B]."""
    n, mean, _ = group_moments(rewards, _require_groups(group_index))
    return (rewards - mean) * n / (n - 1)


def group_normalized(rewards: Tensor, group_index: Tensor | None, cfg: AdvantageConfig) -> Tensor:
    """r̃ = (r − group mean)/(group std + grpo_eps), unbiased std (GRPO). Shape: [B] -> [B]."""
    _, mean, std = group_moments(rewards, _require_groups(group_index))
    return (rewards - mean) / (std + cfg.grpo_eps)


def returns_as_advantages(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, cfg: AdvantageConfig
) -> tuple[Tensor, Tensor]:
    """A = G = discounted returns (REINFORCE family). Shape: [B, T] -> ([B, T], [B, T])."""
    returns = discounted_returns(token_rewards, mask, cfg.gamma)
    return returns, returns


def gae_advantages(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, cfg: AdvantageConfig
) -> tuple[Tensor, Tensor]:
    """GAE with the critic's values. Shape: [B, T] -> ([B, T], [B, T])."""
    if values is None:
        raise ValueError("the 'gae' estimator needs values [B, T]")
    return gae(token_rewards, values, mask, cfg.gamma, cfg.lam)


def _require_groups(group_index: Tensor | None) -> Tensor:
    if group_index is None:
        raise ValueError("this advantage estimator needs group_index [B]")
    return group_index


def _coerce_estimator(obj: object) -> AdvantageEstimator:
    """Registry entries are AdvantageEstimator; a bare function is a shape_rewards function."""
    if isinstance(obj, AdvantageEstimator):
        return obj
    if callable(obj):  # checked for its arity by AdvantageEstimator
        return AdvantageEstimator(shape_rewards=obj, token_advantages=returns_as_advantages)
    raise RegistryError(
        f"an advantage estimator must be an AdvantageEstimator or a function "
        f"(rewards, group_index, cfg) -> shaped rewards, got {obj!r}"
    )


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator", coerce=_coerce_estimator)
_register = ADVANTAGE_ESTIMATORS.register
_register("reinforce_pp", AdvantageEstimator(identity_rewards, returns_as_advantages, "token"))
_register("reinforce_pp_baseline", AdvantageEstimator(group_mean_baseline, returns_as_advantages, "token", True))
_register("grpo", AdvantageEstimator(group_normalized, returns_as_advantages, "none", True))
_register("dr_grpo", AdvantageEstimator(group_mean_baseline, returns_as_advantages, "none", True))
_register("rloo", AdvantageEstimator(leave_one_out_baseline, returns_as_advantages, "none", True))
_register("gae", AdvantageEstimator(identity_rewards, gae_advantages, "token", needs_values=True))

_WHITEN_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": whiten,
    "mean": center,
    "none": lambda x, m: x,
}


# ----------------------------------------------------------------------------- config + entry point


@dataclass(frozen=True)
class AdvantageConfig:
    """Hyperparameters of the advantage computation (validated on construction)."""

    estimator: str = "reinforce_pp"
    """A name in ADVANTAGE_ESTIMATORS (reinforce_pp, reinforce_pp_baseline, grpo, dr_grpo,
    rloo, gae) or a plug-in spec "file.py:fn" / "pkg.module:fn"."""
    gamma: float = 1.0
    """Discount γ in (0, 1]. Must be 1 for group estimators (their baseline is per sequence)."""
    lam: float = 0.95
    """GAE λ in [0, 1]; used by ``gae`` only."""
    kl_coef: float = 0.0
    """β ≥ 0: token reward −β·token_kl. 0 when the KL is a loss term instead."""
    reward_clip: float = 10.0
    """Shaped sequence rewards are clipped to [−reward_clip, reward_clip]; > 0 (inf: off)."""
    whiten: Optional[str] = None
    """"token" (full whitening), "mean" (mean only), "none", or None for the estimator's
    default. True / False are accepted as "token" / "none"."""
    grpo_eps: float = 1e-6
    """ε > 0 added to the group std by ``grpo``."""

    def __post_init__(self) -> None:
        if not isinstance(self.estimator, str):
            raise TypeError(f"AdvantageConfig.estimator must be a string, got {self.estimator!r}")
        owner = "AdvantageConfig"
        try:
            spec = ADVANTAGE_ESTIMATORS.get(self.estimator)
        except (UnknownNameError, RegistryError) as err:
            raise HyperparameterError(owner, "estimator", str(err)) from None
        check_range(owner, "gamma", self.gamma, 0.0, 1.0, low_open=True)
        check_range(owner, "lam", self.lam, 0.0, 1.0)
        check_range(owner, "kl_coef", self.kl_coef, 0.0, math.inf, high_open=True)
        check_range(owner, "reward_clip", self.reward_clip, 0.0, math.inf, low_open=True)
        check_range(owner, "grpo_eps", self.grpo_eps, 0.0, math.inf, low_open=True, high_open=True)
        if isinstance(self.whiten, bool):
            object.__setattr__(self, "whiten", "token" if self.whiten else "none")
        if self.whiten is not None and self.whiten not in WHITEN_MODES:
            raise HyperparameterError(owner, "whiten", f"must be one of {list(WHITEN_MODES)} or None, got {self.whiten!r}")
        if spec.uses_groups and self.gamma != 1.0:
            raise HyperparameterError(
                owner, "gamma", f"must be 1.0 for the group estimator {self.estimator!r} (its baseline is per sequence), "
                f"got {self.gamma}"
            )

    def spec(self) -> AdvantageEstimator:
        """The registry entry of ``estimator``."""
        return ADVANTAGE_ESTIMATORS.get(self.estimator)

    def resolved_whiten(self) -> str:
        """``whiten`` with None replaced by the estimator's default: "token", "mean" or "none"."""
        return self.whiten if self.whiten is not None else self.spec().default_whiten


@dataclass(frozen=True)
class AdvantageOutput:
    """Result of :func:`compute_advantages`. Unpacks as ``advantages, returns = out``.

    Shape:
        advantages, returns, token_rewards: [B, T] (0 on masked positions); shaped_rewards: [B].
    """

    advantages: Tensor
    returns: Tensor
    shaped_rewards: Tensor
    token_rewards: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.advantages, self.returns))


@torch.no_grad()
def compute_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    cfg: AdvantageConfig,
    *,
    group_index: Tensor | None = None,
    token_kl: Tensor | None = None,
    values: Tensor | None = None,
) -> AdvantageOutput:
    """Advantages and returns for a rollout batch (no autograd).

        out = compute_advantages(rewards, response_mask, cfg, group_index=g, token_kl=k, values=v)
        advantages, returns = out  # or out.advantages, out.returns, out.shaped_rewards, out.token_rewards

    Args:
        rewards: sequence rewards (already normalised if wanted), float.
        response_mask: 1 on response tokens.
        cfg: hyperparameters.
        group_index: group (prompt) id of each sequence; required by group estimators.
        token_kl: per-token KL estimate (e.g. :func:`kl_estimate` of old vs ref log-probs);
            required when kl_coef != 0.
        values: critic values; required by estimators with ``needs_values`` (``gae``).

    Shape:
        rewards: [B]; response_mask: [B, T]; group_index: [B] integer; token_kl: [B, T];
        values: [B, T]; returns an :class:`AdvantageOutput` of [B, T] (and [B]) tensors.
    """
    if not isinstance(cfg, AdvantageConfig):
        raise TypeError(f"cfg must be an AdvantageConfig, got {type(cfg).__name__}")
    rewards = check_tensor(rewards, "rewards")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {list(rewards.shape)}")
    mask = check_mask(response_mask)
    B = rewards.shape[0]
    if mask.shape[0] != B:
        raise ValueError(f"response_mask must have shape [B={B}, T], got {list(mask.shape)}")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    rewards = rewards.to(dtype)
    spec = cfg.spec()
    if group_index is not None:
        check_shape(group_index, (B,), "group_index")
        if group_index.is_floating_point() or group_index.dtype == torch.bool or group_index.is_complex():
            raise TypeError(f"group_index must be an integer tensor, got {group_index.dtype}")
    elif spec.uses_groups:
        raise ValueError(f"estimator {cfg.estimator!r} needs group_index [B]")
    if token_kl is not None:
        check_shape(token_kl, mask.shape, "token_kl", floating=True)
    elif cfg.kl_coef != 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs token_kl [B, T] (or set kl_coef=0 to use a KL loss)")
    if values is not None:
        check_shape(values, mask.shape, "values", floating=True)
    elif spec.needs_values:
        raise ValueError(f"estimator {cfg.estimator!r} needs values [B, T]")

    shaped = spec.shape_rewards(rewards, group_index, cfg)
    check_shape(shaped, (B,), f"shaped rewards of estimator {cfg.estimator!r}")
    shaped = shaped.clamp(-cfg.reward_clip, cfg.reward_clip)
    token_rewards = token_rewards_from(shaped, mask, token_kl, cfg.kl_coef)
    advantages, returns = spec.token_advantages(token_rewards, mask, values, cfg)
    advantages = _WHITEN_FNS[cfg.resolved_whiten()](advantages, mask)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    return AdvantageOutput(
        advantages=torch.where(mask, advantages, zero),
        returns=torch.where(mask, returns, zero),
        shaped_rewards=shaped,
        token_rewards=token_rewards,
    )
