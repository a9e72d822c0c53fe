"""ParallelGroups: the one place that reads Megatron's global ``parallel_state``.

Everything else in megatron_rpp receives a :class:`ParallelGroups` and passes its
groups explicitly to every collective.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's tensor-, pipeline- and data-parallel groups and coordinates.

    ``tp_ranks`` / ``pp_ranks`` / ``dp_ranks`` are the global ranks of each group in
    group order, so ``pp_ranks[-1]`` is the last pipeline stage of this rank's pipeline.
    ``vpp_size``: model chunks per pipeline stage (Megatron's virtual pipeline; 1 = none):
    stage p then holds the layers of virtual stages p, p + pp, p + 2 pp, ...
    """

    tp_group: Any
    pp_group: Any
    dp_group: Any
    mp_group: Any
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    vpp_size: int = 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @classmethod
    def from_megatron(cls) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        tp, pp, dp = (
            ps.get_tensor_model_parallel_group(),
            ps.get_pipeline_model_parallel_group(),
            ps.get_data_parallel_group(),
        )
        return cls(
            tp_group=tp,
            pp_group=pp,
            dp_group=dp,
            mp_group=ps.get_model_parallel_group(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            tp_ranks=tuple(dist.get_process_group_ranks(tp)),
            pp_ranks=tuple(dist.get_process_group_ranks(pp)),
            dp_ranks=tuple(dist.get_process_group_ranks(dp)),
            vpp_size=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        )


def initialize_parallel(tp: int = 1, pp: int = 1, *, vpp: int = 1, seed: int = 1234) -> ParallelGroups:
    """Build Megatron's TP×PP×DP groups over the already-initialised world.

    Applies the CPU backend first when this process has no CUDA. DP size is
    ``world_size / (tp * pp)``. ``vpp`` > 1: the interleaved (virtual) pipeline with
    ``vpp`` model chunks per stage (needs ``pp`` > 1).

    Raises:
        ValueError: when ``tp * pp`` does not divide the world size, or ``vpp`` > 1 at ``pp`` = 1.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_rpp.parallel.cpu_backend import apply_cpu_backend
    from megatron_rpp.parallel.pipeline_fixes import apply_pipeline_fixes

    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed initialised first")
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(
            f"tensor_parallel_size ({tp}) × pipeline_parallel_size ({pp}) must divide the world size ({world})"
        )
    if vpp < 1 or (vpp > 1 and pp < 2):
        raise ValueError(f"virtual_pipeline_size ({vpp}) > 1 needs pipeline_parallel_size > 1 (got {pp})")
    apply_pipeline_fixes()
    if not torch.cuda.is_available():
        apply_cpu_backend()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelGroups.from_megatron()
