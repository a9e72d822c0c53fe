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
    """Which DP index each rank has, and which rank reports for each DP index."""

    dp_of_rank: list[int]
    reporter_of_dp: list[int]

    @classmethod
    def from_infos(cls, infos: list[dict]) -> "Layout":
        dp_size = infos[0]["dp_size"]
        reporters = [0] * dp_size
        for i in infos:
            if i["reporter"]:
                reporters[i["dp_rank"]] = i["rank"]
        return cls([i["dp_rank"] for i in infos], reporters)

    @property
    def dp_size(self) -> int:
        return len(self.reporter_of_dp)


def prompt_batch(prompts: list[Prompt]) -> RolloutBatch:
    """The prompts of one step as a batch without responses; ``group_index`` = position in ``prompts``."""
    return RolloutBatch.from_sequences([p.token_ids for p in prompts], [[] for _ in prompts])


def generate(group, prompts: list[Prompt], sampling: SamplingConfig, rng_seed: int) -> RolloutBatch:
    """Generate on every rank (each its own slice of the prompts); prompt-major order.

    Rank r samples with its RNG reseeded to ``rng_seed · 1009 + r`` first, so the
    rollouts of a step are a function of (seed, step, weights) — a resumed run repeats
    them exactly.

    Returns ``B = P·n`` sequences; ``group_index[b]`` is the index of b's prompt in ``prompts``.
    """
    slices = prompt_batch(prompts).split(group.size)
    outs = group.call("generate", [(part, sampling, rng_seed * 1009 + r) for r, part in enumerate(slices)])
    batch = RolloutBatch.cat(outs)
    return batch.select(torch.sort(batch.group_index, stable=True).indices)  # keeps each prompt's n samples in order


def dp_shards(batch: RolloutBatch, layout: Layout) -> list[torch.Tensor]:
    """Each DP rank's rows of ``batch``: balanced by tokens, so the ranks finish together."""
    return balanced_parts(batch.sequence_lengths, layout.dp_size)


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


def train_minibatches(group, layout: Layout, cfg: Config, batch: RolloutBatch) -> tuple[list[dict], dict]:
    """``num_epochs`` passes over the rollout batch in mini-batches of ``train_batch_size``.

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
            outs = group.call("train", [(mb.select(parts[layout.dp_of_rank[r]]), counts) for r in range(group.size)])
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
    batch = generate(group, prompts, sampling, rng_seed=cfg.trainer.seed)
    rewards = sequence_rewards(group, layout, cfg, scorer, tokenizer, batch, prompts, torch.float64)
    return {"eval/reward_mean": float(rewards.mean()),
            "eval/response_length_mean": float(batch.response_lengths.float().mean())}


def finite_or_raise(name: str, values: torch.Tensor) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"{name}: non-finite value at index {bad[0]} ({float(values[bad[0]])})")
