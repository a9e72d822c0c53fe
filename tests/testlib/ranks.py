"""Rank functions shared by distributed tests (module-level so spawned ranks can import them)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def build(cfg: dict, tp: int, pp: int, *, seed: int = 1234, dtype=torch.float32):
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.parallel.groups import initialize_parallel

    groups = initialize_parallel(tp, pp, seed=seed)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(tp)  # padded as a trainer builds it
    return build_gpt_model(spec, groups, dtype=dtype), groups


def tp_gather_last_dim(t: torch.Tensor, groups) -> torch.Tensor:
    if groups.tp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(groups.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1)
