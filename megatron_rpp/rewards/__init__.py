"""Reward functions: a registry of rule rewards, user functions by "file.py:fn", parallel scoring,
and remote HTTP endpoints (``reward.remote_url``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_rpp.config.schema import RewardConfig


def make_scorer(cfg: RewardConfig):
    """The scorer ``cfg`` asks for: the endpoint ``remote_url`` when set, else ``function`` (in a process pool);
    None when a reward model (``model_dir``) scores on the workers instead. A remote endpoint
    must accept a TCP connection already (``RemoteRewardScorer.check_reachable``).

    Both score ``(prompts, responses, samples) -> list[float]`` and have ``close()``.
    """
    if cfg.model_dir:
        return None
    if cfg.remote_url:
        from megatron_rpp.rewards.remote import RemoteRewardScorer

        scorer = RemoteRewardScorer(cfg.remote_url, cfg.remote_timeout_s, cfg.remote_max_retries,
                                    batch_size=cfg.remote_batch_size)
        scorer.check_reachable()  # a dead URL fails now, before any model or engine is built
        return scorer
    from megatron_rpp.rewards.scorer import RewardScorer

    return RewardScorer(cfg.function, cfg.num_workers)
