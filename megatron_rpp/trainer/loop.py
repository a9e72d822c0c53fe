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

from megatron_rpp.config import Config, save_config
from megatron_rpp.config.hyper import needs_critic, sampling_config
from megatron_rpp.checkpoint.train_state import load_rng, save_rng
from megatron_rpp.trainer import checkpointing, phases
from megatron_rpp.trainer.failures import NonFiniteGuard
from megatron_rpp.trainer.setup import RunContext, setup_run
from megatron_rpp.utils import console
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
    critic = needs_critic(cfg)
    # Colocated memory (slime style): only the engine is resident while it generates; it sleeps
    # while Megatron scores and trains; weights wake for the sync, the KV cache after it.
    phases.offload_training_state(group)  # optimizer state -> host (trainer.offload_optimizer_during_rollout)
    with timer("generate"):
        prompts = ctx.stream.next_batch(cfg.rollout.rollout_batch_size)
        sampling = sampling_config(cfg, n=cfg.rollout.n_samples_per_prompt, temperature=cfg.rollout.temperature)
        batch = phases.generate(group, layout, prompts, sampling, rng_seed=cfg.trainer.seed + step)
    phases.sleep_engine(group)  # engine weights + KV cache released (rollout.sleep_level)
    phases.onload_training_state(group)
    with timer("reward"):
        raw = phases.sequence_rewards(group, layout, cfg, ctx.scorer, ctx.tokenizer, batch, prompts)
        rewards = raw
        if ctx.reward_norm is not None:
            ctx.reward_norm.update(rewards)
            rewards = ctx.reward_norm.normalize(rewards).float()
        batch = batch.replace(rewards=rewards)
    with timer("old_log_probs"):
        if needs_old_forward(cfg):
            batch = batch.replace(old_log_probs=phases.score(group, layout, batch, "policy"))
    with timer("ref_log_probs"):
        if a.kl_coef > 0:
            batch = batch.replace(ref_log_probs=phases.score(group, layout, batch, "ref"))
    with timer("values"):
        if critic:  # the estimator needs values: the critic's V(s_t) of every response token
            batch = batch.replace(values=phases.critic_values(group, layout, batch))
    with timer("advantages"):
        mask = batch.response_mask
        batch, out, token_kl = phases.advantages(cfg, batch)
    with timer("train"):
        results, train_tokens = phases.train_minibatches(group, layout, cfg, batch,
                                                         update_policy=phases.policy_trains(cfg, step))
        train = phases.mean_metrics(results)
    with timer("weight_sync"):
        phases.wake_engine(group, ["weights"])
        sync = group.call("sync_weights")[0]
        phases.wake_engine(group, ["kv_cache"])
        every = cfg.rollout.check_sync_interval
        check = group.call("check_sync", tolerance=cfg.rollout.check_sync_tolerance)[0] if every and step % every == 0 else {}
    n_tok = mask.sum().clamp(min=1)
    adv_valid = out.advantages[mask]
    return {
        "reward/mean": float(raw.mean()), "reward/std": float(raw.std()) if len(raw) > 1 else 0.0,
        "response_length/mean": float(batch.response_lengths.float().mean()),
        "kl/mean": float(token_kl.sum() / n_tok) if token_kl is not None else train.get("kl_loss", 0.0),
        "entropy/mean": train.get("entropy", float("nan")), "policy/clip_fraction": train.get("clip_fraction", 0.0),
        "policy/approx_kl": train.get("approx_kl", 0.0), "policy/loss": train.get("loss", float("nan")),
        "advantages/mean": float(adv_valid.mean()), "advantages/std": float(adv_valid.std()) if adv_valid.numel() > 1 else 0.0,
        "grad_norm": train.get("grad_norm", float("nan")), "lr": train.get("lr", cfg.trainer.lr),
        "rollout/logprob_abs_diff": train.get("rollout_logprob_abs_diff", float("nan")),
        "rollout/logprob_max_abs_diff": max((r["rollout_logprob_max_abs_diff"] for r in results
                                             if "rollout_logprob_max_abs_diff" in r), default=float("nan")),
        "weight_sync/bytes": float(sync.get("bytes", 0)), "weight_sync/buckets": float(sync.get("buckets", 0)),
        "weight_sync/direct": float(sync.get("path") == "direct"),
        **({"weight_sync/check_max_abs_diff": check["max_abs_diff"]} if check else {}),
        "tokens/train_real": train_tokens["real"], "tokens/train_padded": train_tokens["padded"],
        **({f"tokens/score_{k}": v for k, v in phases.token_counts(cfg, layout, batch).items()}
           if needs_old_forward(cfg) or a.kl_coef > 0 else {}),
        **({"kl/policy_ref_k3": kl} if (kl := phases.policy_ref_kl(batch)) is not None else {}),
        **(phases.critic_metrics(batch, train) if critic else {}),
        "_tokens": float(batch.sequence_lengths.sum()),
        "_applied": [bool(r[k]) for r in results for k in ("update_ok", "critic/update_ok") if k in r],
    }


def train(cfg: Config) -> dict:
    """Run the whole training job (or continue it, see ``trainer.resume``); returns the final
    summary (also written to summary.json)."""
    t = cfg.trainer
    out_dir, timer = Path(t.output_dir), Timer()
    resume_from = checkpointing.resolve_resume(t.resume, out_dir)  # before anything starts
    resume_state = checkpointing.validate(resume_from) if resume_from else None
    ctx = setup_run(cfg, resume_step=resume_state["step"] if resume_state else None)
    save_config(cfg, out_dir / "config.yaml")
    start = resume_state["step"] if resume_state else 0
    progress = Progress(t.steps, enabled=t.progress, initial=start)
    try:
        if resume_state:
            guard = restore(ctx, resume_from, resume_state)
            first_eval = next((h for h in ctx.logger.history if h["step"] == 0), {})
            console.say(f"{console.PREFIX} resumed from {resume_from} (step {resume_state['step']})")
        else:
            guard = NonFiniteGuard(t.max_nonfinite_steps_in_a_row)
            first_eval = phases.evaluate(ctx.group, ctx.eval_prompts, cfg, ctx.scorer, ctx.tokenizer, ctx.layout)
            ctx.logger.log(0, first_eval)
        for step in range(start + 1, t.steps + 1):
            t0 = time.perf_counter()
            metrics = iteration(ctx, step, timer)
            metrics["train/skipped_steps"] = guard.update(metrics.pop("_applied"), step)
            if (t.eval_interval and step % t.eval_interval == 0) or step == t.steps:
                with timer("eval"):
                    metrics.update(phases.evaluate(ctx.group, ctx.eval_prompts, cfg, ctx.scorer, ctx.tokenizer,
                                                   ctx.layout))
            metrics.update(timer.pop())  # a checkpoint's save time is in the next step's row
            elapsed = time.perf_counter() - t0
            metrics["timing/step"] = elapsed
            metrics["throughput/tokens_per_s"] = metrics.pop("_tokens") / elapsed
            ctx.logger.log(step, metrics)  # before the checkpoint: a checkpoint never lacks its rows
            progress.update(metrics)
            if t.save_interval and step % t.save_interval == 0:
                with timer("checkpoint"):
                    save(ctx, step, guard)
        progress.close()
        if t.export_hf:
            ctx.group.call("export_hf", [(str(out_dir / "hf"),)] * ctx.group.size)
        return summarize(ctx, first_eval)
    finally:
        progress.close()
        ctx.close()


def save(ctx: RunContext, step: int, guard: NonFiniteGuard) -> Path:
    """A complete, atomic checkpoint of the run after ``step`` (workers + controller state)."""
    cfg = ctx.cfg
    tmp = checkpointing.begin_save(cfg.trainer.output_dir, step)
    ctx.group.call("save_checkpoint", [(str(tmp),)] * ctx.group.size)
    save_rng(tmp, "controller")
    save_config(cfg, tmp / "config.yaml")
    state = {
        "step": step,
        "data_stream": ctx.stream.state_dict(),
        "reward_norm": ctx.reward_norm.state_dict() if ctx.reward_norm is not None else None,
        # REINFORCE++ uses a fixed β; kept so an adaptive controller can resume too.
        "kl_controller": {"type": "fixed", "kl_coef": cfg.algorithm.kl_coef},
        "nonfinite": guard.state_dict(),
        "layout": {"num_workers": cfg.trainer.num_workers, "tensor_parallel_size": cfg.model.tensor_parallel_size,
                   "pipeline_parallel_size": cfg.model.pipeline_parallel_size},
    }
    return checkpointing.finish_save(tmp, state, keep=cfg.trainer.keep_checkpoints)


def restore(ctx: RunContext, folder: Path, state: dict) -> NonFiniteGuard:
    """Load a checkpoint into the workers (any DP size) and the controller; returns the guard."""
    cfg = ctx.cfg
    ctx.group.call("load_checkpoint", [(str(folder),)] * ctx.group.size)
    load_rng(folder, "controller")
    ctx.stream.load_state_dict(state["data_stream"])
    if ctx.reward_norm is not None and state["reward_norm"] is not None:
        ctx.reward_norm.load_state_dict(state["reward_norm"])
    saved_kl = state["kl_controller"]["kl_coef"]
    if saved_kl != cfg.algorithm.kl_coef:
        console.say(f"{console.PREFIX} note: algorithm.kl_coef is {cfg.algorithm.kl_coef}, "
                    f"the checkpoint used {saved_kl}")
    nf = state["nonfinite"]
    return NonFiniteGuard(cfg.trainer.max_nonfinite_steps_in_a_row, in_a_row=nf["in_a_row"], total=nf["total"])


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
    console.say("\n".join([f"{console.PREFIX} summary (also in {out_dir / 'summary.json'}):"]
                          + [f"  {k}: {v}" for k, v in summary.items()]))
    return summary
