"""The one adapter from :class:`Config` to the small hyperparameter dataclasses of the algorithms,
the rollout engine and the model provider (``AdvantageConfig``, ``PolicyLossConfig``,
``SamplingConfig``, ``ModelOptions``).

The trainer builds them here, and :func:`~megatron_rpp.config.validate.validate` builds them
here too at load time, so their own checks run before any model or engine exists. Each
builder has a table from dataclass field to the config key it comes from; a
:class:`~megatron_rpp.algorithms.HyperparameterError` is reported under that key.
"""
from __future__ import annotations

from megatron_rpp.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig
from megatron_rpp.algorithms.policy_loss import PolicyLossConfig
from megatron_rpp.config.schema import Config
from megatron_rpp.models.provider import ModelOptions
from megatron_rpp.rollout.engine import SamplingConfig

ADVANTAGE_KEYS = {"estimator": "algorithm.estimator", "gamma": "algorithm.gamma", "lam": "algorithm.lam",
                  "whiten": "algorithm.whiten", "kl_coef": "algorithm.kl_coef", "reward_clip": "reward.clip"}
POLICY_LOSS_KEYS = {"clip_low": "algorithm.clip_low", "clip_high": "algorithm.clip_high",
                    "dual_clip": "algorithm.dual_clip", "tis_high": "algorithm.tis_cap",
                    "kl_loss_coef": "algorithm.kl_coef", "kl_loss_estimator": "algorithm.kl_loss_estimator",
                    "entropy_coef": "algorithm.entropy_coef", "agg_mode": "algorithm.loss_agg_mode"}
SAMPLING_KEYS = {"temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
                 "max_tokens": "model.max_response_length", "n": "rollout.n_samples_per_prompt"}
EVAL_SAMPLING_KEYS = {**SAMPLING_KEYS, "temperature": "rollout.eval_temperature"}


def advantage_config(cfg: Config, *, kl_in_reward: bool = True) -> AdvantageConfig:
    """Advantage hyperparameters. ``kl_in_reward``: the step has a token KL for the reward
    (false when there are no reference log-probs); with ``kl_use_loss`` the KL is never in it."""
    a = cfg.algorithm
    return AdvantageConfig(estimator=a.estimator, gamma=a.gamma, lam=a.lam, whiten=a.whiten or None,
                           kl_coef=a.kl_coef if kl_in_reward and not a.kl_use_loss else 0.0,
                           reward_clip=cfg.reward.clip)


def needs_critic(cfg: Config) -> bool:
    """Whether the run has a critic: the one place that asks the estimator's registry entry
    (``needs_values``); the validator, the workers and the loop all call this, never the name."""
    return ADVANTAGE_ESTIMATORS.get(cfg.algorithm.estimator).needs_values


def policy_loss_config(cfg: Config) -> PolicyLossConfig:
    """Policy-loss hyperparameters (0 in the config = off = None in the dataclass)."""
    a = cfg.algorithm
    return PolicyLossConfig(
        clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip or None,
        tis_high=a.tis_cap or None, kl_loss_coef=a.kl_coef if a.kl_use_loss else 0.0,
        kl_loss_estimator=a.kl_loss_estimator, entropy_coef=a.entropy_coef, agg_mode=a.loss_agg_mode,
    )


def sampling_config(cfg: Config, *, n: int, temperature: float) -> SamplingConfig:
    """Sampling of ``n`` responses per prompt at ``temperature``; greedy (0) ignores top-p/top-k."""
    r = cfg.rollout
    return SamplingConfig(temperature=temperature, top_p=r.top_p if temperature > 0 else 1.0,
                          top_k=r.top_k if temperature > 0 else -1, max_tokens=cfg.model.max_response_length,
                          n=n, seed=None)


def model_options(cfg: Config) -> ModelOptions:
    """How Megatron runs the policy, reference and reward model (sequence parallelism, recompute)."""
    m = cfg.model
    return ModelOptions(sequence_parallel=m.sequence_parallel, recompute=m.recompute,
                        recompute_num_layers=m.recompute_num_layers)


# ----------------------------------------------------------------------------- rollout engine layout (issue 14)


def engine_tensor_parallel_size(cfg: Config) -> int:
    """The rollout engine's TP size k (``rollout.tensor_parallel_size``; 0 = ``model.tensor_parallel_size``)."""
    return cfg.rollout.tensor_parallel_size or cfg.model.tensor_parallel_size
