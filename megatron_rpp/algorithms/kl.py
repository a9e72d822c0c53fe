"""Per-token KL estimators between the policy and the reference model.

With δ = log_probs − ref_log_probs (log-probabilities of the sampled tokens):

    k1 = δ                       unbiased, can be negative
    k2 = δ² / 2                  biased, low variance; its gradient is the KL gradient
                                 (recommended for the KL *loss*, REINFORCE++ paper)
    k3 = exp(−δ) − 1 + δ         unbiased, non-negative (Schulman's estimator)

every estimate is clamped to [−clamp, clamp] (default 10).

Shape letters: any shape works; inputs must match. Elementwise throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import check_tensor
from megatron_rpp.algorithms.registry import Registry

__all__ = ["KLEstimator", "KL_ESTIMATORS", "kl_estimate", "kl_estimate_grad"]


@dataclass(frozen=True)
class KLEstimator:
    """One KL estimator as two pure functions of δ and the clamp value.

    ``value(delta, clamp)`` returns k before the final clamp; ``grad(delta, clamp)`` returns
    dk/dδ = dk/dlog_probs. ``clamp`` is passed so an estimator can keep its
    intermediate values finite where the final clamp is active anyway (see k3).
    """

    value: Callable[[Tensor, float], Tensor]
    grad: Callable[[Tensor, float], Tensor]


KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def _k3_safe_delta(delta: Tensor, clamp: float) -> Tensor:
    # For δ ≤ −(clamp + 1), k3 = e^{|δ|} − 1 − |δ| > clamp (since e^x > 2x), so the final
    # clamp is active there. Clamping δ from below first keeps exp(−δ) and its gradient
    # finite (also in fp16/bf16) and changes no result. Capped at 80 (e^80 is finite in
    # fp32), which only matters for clamp > 79: then k3 saturates near e^80.
    return delta.clamp(min=-min(clamp + 1.0, 80.0))


def _k3_value(d: Tensor) -> Tensor:
    return torch.expm1(-d) + d


KL_ESTIMATORS.register("k1", KLEstimator(value=lambda d, c: d, grad=lambda d, c: torch.ones_like(d)))
KL_ESTIMATORS.register("k2", KLEstimator(value=lambda d, c: 0.5 * d.square(), grad=lambda d, c: d))
KL_ESTIMATORS.register(
    "k3",
    KLEstimator(
        value=lambda d, c: _k3_value(_k3_safe_delta(d, c)),
        grad=lambda d, c: -torch.expm1(-_k3_safe_delta(d, c)),
    ),
)


def _prepare(log_probs: Tensor, ref_log_probs: Tensor, clamp: float) -> Tensor:
    check_tensor(log_probs, "log_probs")
    check_tensor(ref_log_probs, "ref_log_probs")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(
            f"log_probs and ref_log_probs must have the same shape, got {list(log_probs.shape)}"
            f" and {list(ref_log_probs.shape)}"
        )
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or math.isnan(clamp) or clamp <= 0:
        raise ValueError(f"clamp must be a positive number (math.inf for none), got {clamp!r}")
    return log_probs - ref_log_probs


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, kind: str = "k1", clamp: float = 10.0) -> Tensor:
    """Per-token KL estimate, clamped to [−clamp, clamp]; differentiable.

    Args:
        log_probs: log π(y_t) of the sampled tokens (π_old in the reward, π in a KL loss).
        ref_log_probs: log π_ref(y_t), same shape.
        kind: a name in ``KL_ESTIMATORS`` ("k1", "k2", "k3") or a plug-in spec.
        clamp: bound on |k|; ``math.inf`` disables clamping.

    Shape:
        log_probs, ref_log_probs: [...]; returns [...] (same shape, same dtype).
    """
    delta = _prepare(log_probs, ref_log_probs, clamp)
    k = KL_ESTIMATORS.get(kind).value(delta, float(clamp))
    return k.clamp(-clamp, clamp)


def kl_estimate_grad(log_probs: Tensor, ref_log_probs: Tensor, kind: str = "k1", clamp: float = 10.0) -> Tensor:
    """d kl_estimate / d log_probs, elementwise; zero where the clamp is active.

    (d/d ref_log_probs is the negative of this.) Pure, no autograd: a fused kernel can
    produce the KL and its gradient in one pass. Agrees with autograd through
    :func:`kl_estimate`, whose clamp passes the gradient on the bounds themselves.

    Shape:
        log_probs, ref_log_probs: [...]; returns [...].
    """
    delta = _prepare(log_probs, ref_log_probs, clamp)
    est = KL_ESTIMATORS.get(kind)
    k = est.value(delta, float(clamp))
    inside = (k >= -clamp) & (k <= clamp)
    return torch.where(inside, est.grad(delta, float(clamp)), torch.zeros_like(delta))
