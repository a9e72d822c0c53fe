"""Training state to host memory while the colocated engine generates (GPU; ``trainer.offload_optimizer_during_rollout``).

What moves: the optimizer's state tensors (Adam's moments) and, for mixed precision, its fp32
main parameters, to pinned host memory; the DDP gradient buffers are freed (Megatron's
``DistributedDataParallel.offload_grad_buffers`` / ``restore_grad_buffers``, which keep every
``main_grad`` view valid and zero the buffer on restore; gradients are zeroed before each
step anyway). The model's own parameters stay on the device: the weight sync reads them.
That is why Megatron's ``MegatronOptimizer.offload_to_cpu`` is not used: for an fp32 model
its ``param_groups`` hold the model's parameters and it would move them too.

Pure torch plus the two DDP methods; CUDA only (on CPU there is no device memory to free:
config validation refuses the option there).
"""
from __future__ import annotations

from typing import Iterable

import torch


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not), or ``optimizer`` itself."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = chained if chained is not None else [optimizer]
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None]


def move_optimizer_state(optimizer, device: torch.device | str, *, keep: Iterable[torch.Tensor] = ()) -> int:
    """Move every state tensor and every parameter of ``optimizer``'s groups to ``device``, except
    those sharing storage with a tensor in ``keep`` (the model's parameters, and views of them such
    as the distributed optimizer's fp32 shards of an fp32 model). Host copies are pinned. Returns
    the bytes moved.
    """
    device = torch.device(device)
    kept = {t.untyped_storage().data_ptr() for t in keep}
    moved = 0

    def to(t: torch.Tensor) -> torch.Tensor:
        nonlocal moved
        if t.device == device:
            return t
        moved += t.numel() * t.element_size()
        out = t.to(device, non_blocking=True)
        return out.pin_memory() if device.type == "cpu" and torch.cuda.is_available() else out

    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in kept:
                    p.data = to(p.data)
        for state in opt.state.values():
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.dim() > 0:  # a 0-dim ``step`` stays where it is
                    state[key] = to(value)
    return moved


def offload_training_state(ddp, optimizer) -> int:
    """Optimizer state (and fp32 main parameters) to host, gradient buffers freed. Returns bytes moved."""
    moved = move_optimizer_state(optimizer, "cpu", keep=ddp.module.parameters())
    ddp.offload_grad_buffers(synchronize=True, empty_cache=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return moved


def onload_training_state(ddp, optimizer) -> int:
    """The inverse of :func:`offload_training_state` (gradient buffers re-allocated, zeroed)."""
    moved = move_optimizer_state(optimizer, torch.device("cuda", torch.cuda.current_device()),
                                 keep=ddp.module.parameters())
    ddp.restore_grad_buffers(synchronize=True)
    return moved
