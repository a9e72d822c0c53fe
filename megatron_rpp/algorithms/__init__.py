"""REINFORCE++ algorithm core: pure torch math (torch + standard library imports only).

Global quantities (token counts, group ids, values) come in as arguments; nothing here
talks to torch.distributed, Megatron, Ray or vLLM. See docs/algorithms.md.
"""

from megatron_rpp.algorithms._checks import HyperparameterError, check_range
from megatron_rpp.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageEstimator,
    AdvantageOutput,
    center,
    compute_advantages,
    discounted_returns,
    gae,
    whiten,
)
from megatron_rpp.algorithms.aggregation import AGGREGATIONS, aggregate
from megatron_rpp.algorithms.kl import KL_ESTIMATORS, KLEstimator, kl_estimate, kl_estimate_grad
from megatron_rpp.algorithms.policy_loss import (
    POLICY_LOSSES,
    LossOutput,
    PolicyLossConfig,
    policy_loss,
    ppo_clip_loss,
)
from megatron_rpp.algorithms.registry import Registry, RegistryError, UnknownNameError
from megatron_rpp.algorithms.reward_norm import RunningRewardNorm
from megatron_rpp.algorithms.value_loss import explained_variance, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "AdvantageConfig",
    "AdvantageEstimator",
    "AdvantageOutput",
    "HyperparameterError",
    "KLEstimator",
    "KL_ESTIMATORS",
    "LossOutput",
    "POLICY_LOSSES",
    "PolicyLossConfig",
    "Registry",
    "RegistryError",
    "RunningRewardNorm",
    "UnknownNameError",
    "aggregate",
    "center",
    "check_range",
    "compute_advantages",
    "discounted_returns",
    "explained_variance",
    "gae",
    "kl_estimate",
    "kl_estimate_grad",
    "policy_loss",
    "ppo_clip_loss",
    "value_loss",
    "whiten",
]
