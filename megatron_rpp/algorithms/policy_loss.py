"""Policy-gradient loss: PPO-clip (with dual-clip), truncated IS, KL loss, entropy bonus.

Shape letters: B sequences in the micro-batch, T response tokens (padded).

Per response token, with ρ = exp(clamp(log_probs − old_log_probs, −20, 20)) and advantage A:

    ppo_clip     ℓ = max(−ρA, −clip(ρ, 1 − clip_low, 1 + clip_high)·A)
    dual clip    for A < 0: ℓ = min(ℓ, −c·A)      (c = dual_clip > 1; bounds ℓ by c·|A|)
    TIS          ℓ ← w·ℓ, w = clamp(exp(old_log_probs − rollout_log_probs), tis_low, tis_high),
                 detached (corrects for the rollout engine sampling from slightly different
                 probabilities than the trainer computes)
    total        ℓ + kl_loss_coef·k(log_probs, ref_log_probs) − entropy_coef·entropy

and the loss is ``aggregate(total, mask, agg_mode, global counts)`` (see aggregation.py);
with the global token count it is independent of data-parallel size and micro-batching.
Masked positions never reach the loss or its gradient, whatever they hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import HyperparameterError, check_mask, check_range, check_shape, is_number
from megatron_rpp.algorithms.aggregation import AGGREGATIONS, Count, aggregate
from megatron_rpp.algorithms.kl import KL_ESTIMATORS, kl_estimate
from megatron_rpp.algorithms.registry import Registry, RegistryError, UnknownNameError

__all__ = [
    "POLICY_LOSSES",
    "LossOutput",
    "PolicyLossConfig",
    "policy_loss",
    "ppo_clip",
    "ppo_clip_loss",
    "tis_weight",
]

LOG_RATIO_CLAMP = 20.0


class LossOutput(NamedTuple):
    """A scalar loss to back-propagate and detached scalar metrics. Unpacks as ``loss, metrics``."""

    loss: Tensor
    metrics: dict[str, Tensor]


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise HyperparameterError("PolicyLossConfig", name, f"must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyperparameters of the policy loss (validated on construction)."""

    loss: str = "ppo_clip"
    """A name in POLICY_LOSSES or a plug-in spec "file.py:fn" / "pkg.module:fn"."""
    clip_low: float = 0.2
    """ε_low ≥ 0: ρ is clipped from below at 1 − ε_low."""
    clip_high: float = 0.2
    """ε_high ≥ 0: ρ is clipped from above at 1 + ε_high ("clip-higher" when > clip_low)."""
    dual_clip: Optional[float] = None
    """c > 1: for A < 0 the loss is capped at c·|A|. None: off."""
    tis_low: Optional[float] = None
    """Lower truncation of the rollout importance weight (None: no lower bound). Needs tis_high."""
    tis_high: Optional[float] = None
    """Upper truncation of the rollout importance weight; setting it turns TIS on (used
    when rollout_log_probs are given). None: off."""
    kl_loss_coef: float = 0.0
    """β ≥ 0 of the KL loss term β·k(log_probs, ref_log_probs). 0: off."""
    kl_loss_estimator: str = "k2"
    """KL estimator of the loss term (k2 recommended: its gradient is the KL gradient)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient ≥ 0 (subtracted from the loss). 0: off."""
    agg_mode: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm (see aggregation.py)."""

    def __post_init__(self) -> None:
        owner = "PolicyLossConfig"
        named = (("loss", POLICY_LOSSES), ("kl_loss_estimator", KL_ESTIMATORS), ("agg_mode", AGGREGATIONS))
        for name, registry in named:
            try:
                registry.get(getattr(self, name))
            except (UnknownNameError, RegistryError, TypeError) as err:
                raise HyperparameterError(owner, name, str(err)) from None
        check_range(owner, "clip_low", self.clip_low, 0.0, 1.0, high_open=True)
        for name in ("clip_high", "kl_loss_coef", "entropy_coef"):
            check_range(owner, name, getattr(self, name), 0.0, math.inf, high_open=True)
        d = self.dual_clip
        _check("dual_clip", d is None or (is_number(d) and 1 < d < math.inf), "None or a finite number > 1", d)
        hi, lo = self.tis_high, self.tis_low
        _check("tis_high", hi is None or (is_number(hi) and 0 < hi < math.inf), "None or a finite number > 0", hi)
        _check("tis_low", lo is None or (is_number(lo) and lo >= 0), "None or a number >= 0", lo)
        _check("tis_low", lo is None or (hi is not None and lo <= hi), "None, or <= tis_high (which must be set)", lo)


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, PolicyLossConfig], "tuple[Tensor, dict[str, Tensor]]"]
"""(log_probs, old_log_probs, advantages, cfg) -> (per-token loss [B, T], per-token stats
{name: [B, T]}); stats are averaged over valid tokens into the metrics."""

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, cfg: PolicyLossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO-clip loss with optional dual clip (module docstring).

    Stats: ``clip_fraction`` (the clipped term is the active one), ``dual_clip_fraction``
    (A < 0 and the dual-clip cap is active).

    Shape:
        log_probs, old_log_probs, advantages: [B, T]; returns ([B, T], {name: [B, T]}).
    """
    ratio = torch.exp((log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clip_fraction": (clipped > unclipped).to(loss.dtype)}
    if cfg.dual_clip is not None:
        cap = -cfg.dual_clip * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        stats["dual_clip_fraction"] = dual.to(loss.dtype)
    else:
        stats["dual_clip_fraction"] = torch.zeros_like(loss)
    return loss, stats


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    # [B, T] -> scalar, local valid tokens; detached (metrics only)
    x = x.detach()
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / mask.sum().clamp(min=1)


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_inputs(
    mask: Tensor, required: dict[str, Tensor], optional: dict[str, Tensor | None], cfg: PolicyLossConfig
) -> None:
    for name, t in required.items():
        check_shape(t, mask.shape, name, floating=True)
    for name, t in optional.items():
        if t is not None:
            check_shape(t, mask.shape, name, floating=True)
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"cfg must be a PolicyLossConfig, got {type(cfg).__name__}")
    if cfg.kl_loss_coef > 0 and optional["kl"] is None and optional["ref_log_probs"] is None:
        raise ValueError("PolicyLossConfig.kl_loss_coef > 0 needs ref_log_probs or kl")
    if cfg.entropy_coef > 0 and optional["entropy"] is None:
        raise ValueError("PolicyLossConfig.entropy_coef > 0 needs entropy")


def tis_weight(old_log_probs: Tensor, rollout_log_probs: Tensor, low: float | None, high: float) -> Tensor:
    """Truncated importance weight clamp(exp(old − rollout), low or 0, high); detached.

    Shape:
        old_log_probs, rollout_log_probs: [B, T]; returns [B, T].
    """
    log_w = (old_log_probs - rollout_log_probs).detach()
    weight = torch.exp(log_w.clamp(max=math.log(high) + 1.0))  # stays finite; truncated below
    return weight.clamp(min=0.0 if low is None else low, max=high)


def _regularizers(
    log_probs: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    ref_log_probs: Tensor | None,
    kl: Tensor | None,
    entropy: Tensor | None,
    metrics: dict[str, Tensor],
) -> Tensor | None:
    """β·KL − entropy_coef·entropy per token ([B, T]), or None; fills metrics. Inputs are
    already zero on masked positions."""
    extra = None
    if kl is None and ref_log_probs is not None:
        kl = kl_estimate(log_probs, ref_log_probs.detach(), cfg.kl_loss_estimator)
    if kl is not None:
        metrics["kl_loss"] = _masked_mean(kl, mask)
        if cfg.kl_loss_coef > 0:
            extra = cfg.kl_loss_coef * kl
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
        if cfg.entropy_coef > 0:
            bonus = -cfg.entropy_coef * entropy
            extra = bonus if extra is None else extra + bonus
    return extra


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cfg: PolicyLossConfig = PolicyLossConfig(),
    *,
    global_token_count: Count = None,
    global_seq_count: Count = None,
    max_response_len: int | None = None,
    ref_log_probs: Tensor | None = None,
    rollout_log_probs: Tensor | None = None,
    entropy: Tensor | None = None,
    kl: Tensor | None = None,
) -> LossOutput:
    """The policy loss of one (micro-)batch and its metrics.

    Args:
        log_probs: log π(y_t) under the current policy (with grad).
        old_log_probs: log π_old(y_t) of the policy that produced the rollout (trainer side).
        advantages: from :func:`compute_advantages`.
        response_mask: 1 on response tokens.
        cfg: hyperparameters.
        global_token_count / global_seq_count / max_response_len: aggregation counts over the
            whole mini-batch on all ranks (see aggregation.py); local counts if None.
        ref_log_probs: log π_ref(y_t); used for the KL loss when ``kl`` is not given.
        rollout_log_probs: the rollout engine's log-probs; with ``cfg.tis_high`` turns on TIS.
        entropy: per-token entropy (with grad when entropy_coef > 0).
        kl: precomputed per-token KL between π and π_ref (with grad), e.g. from a fused
            kernel; takes precedence over ``ref_log_probs``.

    Metrics (detached; averages over the local valid tokens except ``pg_loss``, which is
    aggregated like the loss): ``pg_loss``, ``clip_fraction``, ``dual_clip_fraction``,
    ``approx_kl`` (k3 estimate of KL(π_old ‖ π)), ``kl_loss`` when a KL is available,
    ``entropy`` when given, ``tis_weight`` when TIS is on.

    Shape:
        all tensors: [B, T]; returns a scalar loss.
    """
    mask = check_mask(response_mask)
    required = {"log_probs": log_probs, "old_log_probs": old_log_probs, "advantages": advantages}
    optional = {"ref_log_probs": ref_log_probs, "rollout_log_probs": rollout_log_probs, "entropy": entropy, "kl": kl}
    _check_inputs(mask, required, optional, cfg)
    # Zero every input on masked positions first: whatever they held (padding, -inf, NaN),
    # the loss there is then a finite 0 and `where` sends them an exactly-zero gradient.
    log_probs, old_log_probs, advantages, ref_log_probs, rollout_log_probs, entropy, kl = (
        None if t is None else _zero_masked(t, mask)
        for t in (log_probs, old_log_probs.detach(), advantages.detach(), ref_log_probs, rollout_log_probs, entropy, kl)
    )

    token_loss, stats = POLICY_LOSSES.get(cfg.loss)(log_probs, old_log_probs, advantages, cfg)
    check_shape(token_loss, mask.shape, f"per-token loss of {cfg.loss!r}")
    metrics = {name: _masked_mean(value, mask) for name, value in stats.items()}
    if cfg.tis_high is not None and rollout_log_probs is not None:
        weight = tis_weight(old_log_probs, rollout_log_probs, cfg.tis_low, cfg.tis_high)
        token_loss = token_loss * weight
        metrics["tis_weight"] = _masked_mean(weight, mask)
    agg = dict(global_token_count=global_token_count, global_seq_count=global_seq_count)
    agg.update(max_response_len=max_response_len)
    metrics["pg_loss"] = aggregate(token_loss.detach(), mask, cfg.agg_mode, **agg)
    extra = _regularizers(log_probs, mask, cfg, ref_log_probs, kl, entropy, metrics)
    total = token_loss if extra is None else token_loss + extra
    metrics["approx_kl"] = _masked_mean(kl_estimate(old_log_probs, log_probs.detach(), "k3", math.inf), mask)
    return LossOutput(aggregate(total, mask, cfg.agg_mode, **agg), metrics)


def ppo_clip_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    num_tokens: Count = None,
    *,
    agg_mode: str = "token_mean",
    num_seqs: Count = None,
    max_response_len: int | None = None,
    tis_low: float | None = None,
    tis_high: float | None = None,
    rollout_log_probs: Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_estimator: str = "k2",
    ref_log_probs: Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: Tensor | None = None,
) -> LossOutput:
    """Keyword form of :func:`policy_loss` with the "ppo_clip" loss.

    ``num_tokens`` / ``num_seqs`` are the global token / sequence counts. Returns
    ``(loss, metrics)``.

    Shape:
        all tensors: [B, T]; returns a scalar loss.
    """
    cfg = PolicyLossConfig(
        loss="ppo_clip",
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        tis_low=tis_low,
        tis_high=tis_high,
        kl_loss_coef=kl_loss_coef,
        kl_loss_estimator=kl_loss_estimator,
        entropy_coef=entropy_coef,
        agg_mode=agg_mode,
    )
    return policy_loss(
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        cfg,
        global_token_count=num_tokens,
        global_seq_count=num_seqs,
        max_response_len=max_response_len,
        ref_log_probs=ref_log_probs,
        rollout_log_probs=rollout_log_probs,
        entropy=entropy,
    )
