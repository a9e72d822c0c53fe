"""Clipped PPO value (critic) loss.

Shape letters: B sequences in the micro-batch, T response tokens (padded).

Per response token, with v_clip = old_values + clamp(values − old_values, −ε, ε):

    ℓ = 0.5 · max((values − returns)², (v_clip − returns)²)      (ε = clip_range)
    ℓ = 0.5 · (values − returns)²                                 (clip_range = None)

aggregated like the policy loss (see aggregation.py; pass the global token count).

:func:`explained_variance` says how much of the returns' variance the values explain:
1 − Var(returns − values) / Var(returns) over the response tokens (1: perfect, 0: no better
than a constant, < 0: worse than one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import check_mask, check_shape
from megatron_rpp.algorithms.aggregation import Count, aggregate
from megatron_rpp.algorithms.policy_loss import LossOutput

__all__ = ["explained_variance", "value_loss"]


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    agg_mode: str = "token_mean",
    global_token_count: Count = None,
    global_seq_count: Count = None,
) -> LossOutput:
    """Clipped value loss of one (micro-)batch.

    Args:
        values: critic values (with grad).
        old_values: values of the critic at rollout time.
        returns: targets from :func:`compute_advantages` (``gae``).
        response_mask: 1 on response tokens.
        clip_range: ε > 0, or None for the unclipped loss.

    Metrics (detached, local valid-token means): ``value_clip_fraction`` (the clipped term
    is the larger one), ``values`` (mean value), ``value_error`` (mean |values − returns|).

    Shape:
        all tensors: [B, T]; returns a scalar loss.
    """
    mask = check_mask(response_mask)
    for t, name in ((values, "values"), (old_values, "old_values"), (returns, "returns")):
        check_shape(t, mask.shape, name, floating=True)
    if clip_range is not None and (
        isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not 0 < clip_range < math.inf
    ):
        raise ValueError(f"clip_range must be None or a finite number > 0, got {clip_range!r}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # zero masked positions first: finite loss there and an exactly-zero gradient via `where`
    values = torch.where(mask, values, zero)
    old_values = torch.where(mask, old_values.detach(), zero)
    returns = torch.where(mask, returns.detach(), zero)
    unclipped = (values - returns).square()
    if clip_range is None:
        token_loss = 0.5 * unclipped
        clipped_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns).square()
        token_loss = 0.5 * torch.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    n = mask.sum().clamp(min=1)
    metrics = {
        "value_clip_fraction": (clipped_active & mask).sum().to(values.dtype) / n,
        "values": torch.where(mask, values.detach(), zero).sum() / n,
        "value_error": torch.where(mask, (values - returns).detach().abs(), zero).sum() / n,
    }
    loss = aggregate(
        token_loss, mask, agg_mode, global_token_count=global_token_count, global_seq_count=global_seq_count
    )
    return LossOutput(loss, metrics)


def explained_variance(values: Tensor, returns: Tensor, response_mask: Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over the response tokens (population variances).

    NaN when the returns do not vary (nothing to explain) or there are no response tokens.

    Shape:
        values, returns, response_mask: [B, T]; returns a float.
    """
    mask = check_mask(response_mask)
    check_shape(values, mask.shape, "values", floating=True)
    check_shape(returns, mask.shape, "returns", floating=True)
    v, r = values[mask].double(), returns[mask].double()  # [B, T] -> [N]
    if r.numel() == 0:
        return math.nan
    var_r = (r - r.mean()).square().mean()
    if float(var_r) == 0.0:
        return math.nan
    e = r - v
    return float(1.0 - (e - e.mean()).square().mean() / var_r)
