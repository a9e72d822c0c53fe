"""The REINFORCE++ loop: generate → score → rewards → advantages → update → sync → log.

Read top to bottom; every phase lives in :mod:`phases`. The loop never branches on an
algorithm's name: the estimator, KL estimator and loss come from the config through
the algorithm registries.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_rpp.algorithms.advantages import AdvantageConfig, compute_advantages
from megatron_rpp.algorithms.kl import kl_estimate
from megatron_rpp.config import Config, save_config
from megatron_rpp.trainer import phases
from megatron_rpp.trainer.setup import RunContext, setup_run
from megatron_rpp.utils.logging import Progress, Timer, plot_rewards


def needs_old_forward(cfg: Config) -> bool:
    """π_old equals the detached current policy when the rollout batch is trained in one
    mini-batch for one epoch; a separate forward is then needed only for a KL in the reward."""
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    single_update = t.num_epochs == 1 and t.train_batch_size == r.rollout_batch_size * r.n_samples_per_prompt
    kl_in_reward = a.kl_coef > 0 and not a.kl_use_loss
    return not single_update or kl_in_reward


def iteration(ctx: RunContext, step: int, timer: Timer) -> dict:
    cfg, group, layout = ctx.cfg, ctx.group, ctx.layout
    a = cfg.algorithm
    with timer("generate"):
        prompts = ctx.stream.next_batch(cfg.rollout.rollout_batch_size)
        sampling = phases.sampling_args(cfg, n=cfg.rollout.n_samples_per_prompt,
                                        temperature=cfg.rollout.temperature, seed=cfg.trainer.seed + step)
        seqs = phases.generate(group, prompts, sampling)
    with timer("reward"):
        raw = phases.sequence_rewards(group, layout, cfg, ctx.scorer, ctx.tokenizer, seqs)
        rewards = torch.tensor(raw, dtype=torch.float32)
        if ctx.reward_norm is not None:
            ctx.reward_norm.update(rewards)
            rewards = ctx.reward_norm.normalize(rewards).float()
    with timer("old_log_probs"):
        if needs_old_forward(cfg):
            for s, lp in zip(seqs, phases.score(group, layout, seqs, "policy")):
                s["old_log_probs"] = lp
    with timer("ref_log_probs"):
        if a.kl_coef > 0:
            for s, lp in zip(seqs, phases.score(group, layout, seqs, "ref")):
                s["ref_log_probs"] = lp
    with timer("advantages"):
        _, mask = phases.to_padded(seqs, "")
        token_kl = None
        if "old_log_probs" in seqs[0] and "ref_log_probs" in seqs[0]:
            token_kl = kl_estimate(phases.to_padded(seqs, "old_log_probs")[0],
                                   phases.to_padded(seqs, "ref_log_probs")[0], a.kl_estimator) * mask
        adv_cfg = AdvantageConfig(estimator=a.estimator, gamma=a.gamma, whiten=a.whiten or None,
                                  kl_coef=0.0 if a.kl_use_loss or token_kl is None else a.kl_coef,
                                  reward_clip=cfg.reward.clip)
        out = compute_advantages(rewards, mask, adv_cfg, group_index=torch.tensor([s["group"] for s in seqs]),
                                 token_kl=token_kl if adv_cfg.kl_coef > 0 else None)
        for b, s in enumerate(seqs):
            s["advantages"] = out.advantages[b, : len(s["response_ids"])].tolist()
    with timer("train"):
        train = phases.mean_metrics(phases.train_minibatches(group, layout, cfg, seqs))
    with timer("weight_sync"):
        sync = group.call("sync_weights")[0]
        every = cfg.rollout.check_sync_interval
        check = group.call("check_sync", tolerance=cfg.rollout.check_sync_tolerance)[0] if every and step % every == 0 else {}
    n_tok = mask.sum().clamp(min=1)
    adv_valid = out.advantages[mask]
    return {
        "reward/mean": float(torch.tensor(raw).mean()), "reward/std": float(torch.tensor(raw).std()) if len(raw) > 1 else 0.0,
        "response_length/mean": float(mask.sum(1).float().mean()),
        "kl/mean": float(token_kl.sum() / n_tok) if token_kl is not None else train.get("kl_loss", 0.0),
        "entropy/mean": train.get("entropy", float("nan")), "policy/clip_fraction": train.get("clip_fraction", 0.0),
        "policy/approx_kl": train.get("approx_kl", 0.0), "policy/loss": train.get("loss", float("nan")),
        "advantages/mean": float(adv_valid.mean()), "advantages/std": float(adv_valid.std()) if adv_valid.numel() > 1 else 0.0,
        "grad_norm": train.get("grad_norm", float("nan")), "lr": train.get("lr", cfg.trainer.lr),
        "rollout/logprob_abs_diff": train.get("rollout_logprob_abs_diff", float("nan")),
        "weight_sync/bytes": float(sync.get("bytes", 0)), "weight_sync/buckets": float(sync.get("buckets", 0)),
        **({"weight_sync/check_max_abs_diff": check["max_abs_diff"]} if check else {}),
        "_tokens": float(sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in seqs)),
    }


def train(cfg: Config) -> dict:
    """Run the whole training job; returns the final summary (also written to summary.json)."""
    ctx = setup_run(cfg)
    out_dir, timer, t = Path(cfg.trainer.output_dir), Timer(), cfg.trainer
    save_config(cfg, out_dir / "config.yaml")
    progress = Progress(t.steps, enabled=t.progress)
    try:
        first_eval = phases.evaluate(ctx.group, ctx.eval_prompts, cfg, ctx.scorer, ctx.tokenizer)
        ctx.logger.log(0, first_eval)
        for step in range(1, t.steps + 1):
            t0 = time.perf_counter()
            metrics = iteration(ctx, step, timer)
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.steps:
                with timer("eval"):
                    metrics.update(phases.evaluate(ctx.group, ctx.eval_prompts, cfg, ctx.scorer, ctx.tokenizer))
            metrics.update(timer.pop())
            elapsed = time.perf_counter() - t0
            metrics["timing/step"] = elapsed
            metrics["throughput/tokens_per_s"] = metrics.pop("_tokens") / elapsed
            ctx.logger.log(step, metrics)
            progress.update(metrics)
        progress.close()
        if t.export_hf:
            ctx.group.call("export_hf", [(str(out_dir / "hf"),)] * ctx.group.size)
        return summarize(ctx, first_eval)
    finally:
        progress.close()
        ctx.close()


def summarize(ctx: RunContext, first_eval: dict) -> dict:
    out_dir = Path(ctx.cfg.trainer.output_dir)
    hist = ctx.logger.history
    last_eval = next((h for h in reversed(hist) if "eval/reward_mean" in h and h["step"] > 0), {})
    train_rows = [h for h in hist if "reward/mean" in h]
    summary = {
        "steps": len(train_rows),
        "eval_reward_start": first_eval.get("eval/reward_mean"),
        "eval_reward_end": last_eval.get("eval/reward_mean"),
        "train_reward_first": train_rows[0]["reward/mean"] if train_rows else None,
        "train_reward_last": train_rows[-1]["reward/mean"] if train_rows else None,
        "prompts_skipped_too_long": ctx.skipped_prompts,
        "mean_step_seconds": sum(h["timing/step"] for h in train_rows) / max(1, len(train_rows)),
    }
    plot_rewards(hist, out_dir / "reward_curve.png")
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in summary.items()))
    return summary
