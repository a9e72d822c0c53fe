"""Megatron DDP + Megatron optimizer for a policy shard.

The loss convention of :mod:`megatron_rpp.models.pipeline` (each micro-batch returns
its share of the global loss) is installed here, before DDP reads the config: DDP then
sums gradients across data-parallel replicas instead of averaging them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rpp.models.pipeline import prepare_config_for_rl


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyperparameters (a small frozen view of the trainer config)."""

    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


def wrap_for_training(model, cfg: OptimConfig, *, dtype: torch.dtype = torch.float32):
    """Wrap a GPTModel shard in Megatron DDP and build its Megatron optimizer.

    Returns:
        ``(ddp_model, optimizer)``. One step: ``ddp_model.zero_grad_buffer()``,
        ``optimizer.zero_grad()``, forward/backward through
        :func:`megatron_rpp.models.pipeline.forward_backward`, then
        ``ok, grad_norm, _ = optimizer.step()``.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if dtype != torch.float32 and not torch.cuda.is_available():
        raise ValueError(f"model.dtype {dtype}: Megatron's mixed-precision optimizer needs CUDA tensors; "
                         "train in fp32 on CPU (allowed there: fp32)")
    prepare_config_for_rl(model.config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    return ddp_model, optimizer


def step_if_finite(ddp_model, optimizer, loss: torch.Tensor) -> tuple[bool, float | None]:
    """``optimizer.step()`` unless the loss or any gradient is NaN/inf on any rank.

    Call after the backward pass (gradients reduced). Every rank of the world takes the
    same decision (one all-reduce of a flag), so TP/PP/DP replicas never diverge. A
    skipped step leaves weights and optimizer state untouched and zeroes the gradients.

    Returns:
        ``(applied, grad_norm)``; ``grad_norm`` is None for a skipped step.
    """
    import torch.distributed as dist

    bad = torch.tensor([0.0 if bool(torch.isfinite(loss).all()) else 1.0])
    for buf in [*ddp_model.buffers, *ddp_model.expert_parallel_buffers]:
        if not bool(torch.isfinite(buf.grad_data).all()):
            bad.fill_(1.0)
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bad = bad.to(device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad.item()):
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        return False, None
    ok, grad_norm, _ = optimizer.step()
    return bool(ok), grad_norm
