"""Megatron DDP + Megatron optimizer for a policy shard.

The loss convention of :mod:`megatron_rpp.models.pipeline` (each micro-batch returns
its share of the global loss) is installed here, before DDP reads the config: DDP then
sums gradients across data-parallel replicas instead of averaging them.

``use_distributed_optimizer`` (``trainer.distributed_optimizer``): Megatron's distributed
optimizer (ZeRO-1): the fp32 main parameters and Adam moments are sharded over the
data-parallel ranks, gradients are reduce-scattered instead of all-reduced, and the updated
parameters all-gathered after each step. With one DP rank it holds the whole state, like
the plain optimizer, and takes the same steps. bf16 on CUDA uses Megatron's mixed-precision
optimizers (fp32 main parameters and moments, bf16 model parameters); on CPU only fp32.

A model is one GPTModel or ``ModelChunks`` (virtual-pipeline chunks): each chunk gets its own
DDP wrapper (only the first with gradient bucketing, as Megatron does), one optimizer covers all.
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
    """Wrap a GPTModel shard (or its chunks) in Megatron DDP and build its Megatron optimizer.

    Returns:
        ``(ddp_model, optimizer)``; ``ddp_model`` is one DDP for a GPTModel, ``ModelChunks`` of
        DDPs for ``ModelChunks``. One step: :func:`zero_grad`, forward/backward through
        :func:`megatron_rpp.models.pipeline.forward_backward`, then :func:`step_if_finite`.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_rpp.models.pipeline import ModelChunks

    if dtype != torch.float32 and not torch.cuda.is_available():
        raise ValueError(f"model.dtype {dtype}: Megatron's mixed-precision optimizer needs CUDA tensors; "
                         "train in fp32 on CPU (allowed there: fp32)")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    prepare_config_for_rl(chunks[0].config)  # one config object for all chunks (provider.build_model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=k > 0)
               for k, c in enumerate(chunks)]
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
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    use_fused_cpu_adam(optimizer)
    return (ModelChunks(wrapped) if isinstance(model, (list, tuple)) else wrapped[0]), optimizer


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p.optimizer for p in parts if isinstance(getattr(p, "optimizer", None), torch.optim.Optimizer)]


def use_fused_cpu_adam(optimizer) -> int:
    """Switch torch's Adam / AdamW to its fused kernel for every parameter group held on CPU.

    Without apex or transformer-engine megatron-core steps with ``torch.optim.AdamW``, which on
    CPU tensors defaults to its per-tensor loop: ~8 elementwise passes, each a temporary the size of
    the tensor. The fused kernel (``torch._fused_adamw_``) does the same update in one pass: the
    step (with the clip) is 4x faster for SmolLM2's 135M parameters (``benchmarks/bench_optimizer.py``).
    CUDA groups are left alone (they use the fused apex/TE optimizers, or torch's CUDA default).
    ``fused`` is read from the group at every step; a checkpoint load keeps it
    (``checkpoint/train_state.py``). Returns the number of groups switched.
    """
    switched = 0
    for opt in torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        for group in opt.param_groups:
            on_cpu = all(p.device.type == "cpu" and p.is_floating_point() for p in group["params"])
            if on_cpu and group["params"] and not group.get("foreach") and not group.get("differentiable"):
                group["fused"] = True
                switched += 1
    return switched


def zero_grad(ddp_model, optimizer) -> None:
    """Zero DDP's gradient buffers (every chunk) and the optimizer's gradients before a step."""
    for chunk in ddp_model if isinstance(ddp_model, (list, tuple)) else [ddp_model]:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, without an element-sized temporary.

    ``torch.isfinite(t).all()`` is the composite ``(t == t) * (t.abs() != inf)``: over a
    rank's fp32 gradient buffer its temporaries (``abs`` fp32 and three bool tensors) are
    7 bytes per parameter, alive together. ``aminmax`` is one reduction whose NaN
    propagates to both results and whose inf reaches the max (+inf) or the min (-inf), so
    the buffer is all finite exactly when both scalars are.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack([lo, hi])).all())


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
    chunks = ddp_model if isinstance(ddp_model, (list, tuple)) else [ddp_model]
    for buf in [b for c in chunks for b in (*c.buffers, *c.expert_parallel_buffers)]:
        if not all_finite(buf.grad_data):
            bad.fill_(1.0)
    if dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bad = bad.to(device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad.item()):
        zero_grad(ddp_model, optimizer)
        return False, None
    ok, grad_norm, _ = optimizer.step()
    return bool(ok), grad_norm
