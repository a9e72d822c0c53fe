"""Engine groups and the model each rollout engine runs (pure: torch and model specs, no vLLM).

**Engine groups.** ``rollout.tensor_parallel_size`` = k consecutive ranks share ONE vLLM
engine (vLLM's external launcher forms its TP groups from consecutive ranks of the torch
world; the world's other ranks form further, independent engines: vLLM's "external DP").
Each rank holds 1/k of that engine's weights; engine data-parallel size = world / k. All
ranks of a group must make the same calls with the same prompts and the same sampling
seed; the group's first rank (its *leader*) returns the group's samples.

Megatron orders ranks TP-fastest (tp, dp, pp), so with k = Megatron TP an engine group IS
a Megatron TP group (same ranks, same TP rank): each rank can hand its engine its own
shards (``rollout/vllm_shards.py``). With k a multiple of Megatron TP a group spans k / tp
TP groups (of other DP replicas or pipeline stages), with k a divisor it is part of one;
both take the all-gather sync (every rank reassembles every full tensor).

**The engine's model.** vLLM shards attention heads evenly over its TP ranks (or
replicates KV heads when k is a multiple of them); models whose heads do not split
(SmolLM2: 9 query heads, 3 KV heads at k = 2) run in the engine with zero KV groups
appended, exactly as Megatron pads them (``ModelSpec.for_tp``): zero Q/K/V rows and zero
``o_proj`` columns contribute nothing, so the padded engine computes the same function.
With k = Megatron TP the engine takes Megatron's own padding (same heads per rank on both
sides); otherwise the real heads when vLLM can split them, else padding to a multiple of k.
vLLM models that derive ``head_dim`` from hidden / heads (Qwen2) cannot take padding: they
run their real heads, which must then split over k (a config error otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch

from megatron_rpp.models.spec import ModelSpec


@dataclass(frozen=True)
class EngineGroups:
    """Which ranks share an engine: groups of ``tensor_parallel_size`` consecutive ranks."""

    world_size: int
    tensor_parallel_size: int

    def __post_init__(self) -> None:
        problem = engine_tp_problem(self.world_size, self.tensor_parallel_size, None)
        if problem:
            raise ValueError(problem)

    @property
    def num_groups(self) -> int:
        """Engine data-parallel size (independent engines)."""
        return self.world_size // self.tensor_parallel_size

    def group_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def leader_of(self, group: int) -> int:
        """The group's first rank: the one that returns the group's samples."""
        return group * self.tensor_parallel_size

    def is_leader(self, rank: int) -> bool:
        return rank % self.tensor_parallel_size == 0

    def rank_in_group(self, rank: int) -> int:
        """The rank's TP rank inside its engine."""
        return rank % self.tensor_parallel_size


def engine_tp_problem(world_size: int, engine_tp: int, megatron_tp: int | None) -> str | None:
    """Why engine TP ``engine_tp`` cannot run in a world of ``world_size`` ranks with Megatron TP
    ``megatron_tp`` (None: not checked), or None. Used by config validation and :class:`EngineGroups`."""
    if engine_tp < 1 or world_size % engine_tp:
        return f"rollout.tensor_parallel_size ({engine_tp}) must divide trainer.num_workers ({world_size})"
    if megatron_tp is not None and engine_tp % megatron_tp and megatron_tp % engine_tp:
        return (f"rollout.tensor_parallel_size ({engine_tp}) must be a divisor or a multiple of "
                f"model.tensor_parallel_size ({megatron_tp}): an engine group is a whole number of Megatron TP "
                "groups, or a part of one")
    return None


# ----------------------------------------------------------------------------- the engine's model


def heads_split(num_heads: int, num_groups: int, engine_tp: int) -> bool:
    """vLLM can shard these heads over ``engine_tp`` ranks: query heads evenly, KV heads evenly or replicated."""
    return num_heads % engine_tp == 0 and (num_groups % engine_tp == 0 or engine_tp % num_groups == 0)


def engine_query_groups(num_heads: int, num_groups: int, engine_tp: int, megatron_tp: int,
                        *, can_pad: bool = True) -> int:
    """KV groups of the model the engine runs (module doc): Megatron's padding at k = Megatron TP,
    else the real groups when vLLM can split them over k ranks, else padded to a multiple of k.
    ``can_pad`` False (an engine model that cannot take extra heads): always the real groups.

    Raises:
        ValueError: naming ``rollout.tensor_parallel_size`` when the real heads must be used and do not split.
    """
    padded = -(-num_groups // engine_tp) * engine_tp
    if not can_pad:
        if not heads_split(num_heads, num_groups, engine_tp):
            raise ValueError(f"rollout.tensor_parallel_size ({engine_tp}) must divide num_attention_heads ({num_heads}) "
                             f"and divide or be a multiple of num_key_value_heads ({num_groups}): this engine model "
                             "cannot run with padded heads")
        return num_groups
    if engine_tp == megatron_tp:
        return padded
    return num_groups if heads_split(num_heads, num_groups, engine_tp) else padded


def engine_spec(spec: ModelSpec, engine_tp: int, megatron_tp: int) -> ModelSpec:
    """The spec of the HF model the engine runs, for conversion from ``spec`` (the Megatron model's,
    ``for_tp(megatron_tp)``). Its KV groups are all real (no ``padded_query_groups``); the
    vocabulary padding of Megatron's is kept, so conversion drops it (vLLM pads on its own).
    Heads are padded only for engine models that read ``head_dim`` from the config
    (``vllm_shards.VLLM_HEAD_DIM_FROM_CONFIG``)."""
    from megatron_rpp.rollout.vllm_shards import VLLM_HEAD_DIM_FROM_CONFIG

    groups = engine_query_groups(spec.num_attention_heads, spec.num_query_groups, engine_tp, megatron_tp,
                                 can_pad=spec.architecture in VLLM_HEAD_DIM_FROM_CONFIG)
    per_group = spec.num_attention_heads // spec.num_query_groups
    return replace(spec, num_query_groups=groups, num_attention_heads=groups * per_group, padded_query_groups=None)


def engine_hf_config(hf_config: Mapping[str, Any], spec: ModelSpec, engine: ModelSpec) -> dict:
    """``hf_config`` with the engine's head counts (``engine``: :func:`engine_spec`); unchanged when
    the engine runs the real heads. ``head_dim`` is written out: it no longer follows from hidden / heads."""
    out = dict(hf_config)
    if engine.num_query_groups != spec.num_query_groups:
        out.update(num_attention_heads=engine.num_attention_heads, num_key_value_heads=engine.num_query_groups,
                   head_dim=spec.kv_channels)
    return out


#: Megatron roles whose layout carries KV groups: rows of ``linear_qkv`` (and its bias), columns of ``linear_proj``.
GROUPED_ROLES = {"qkv": 0, "qkv_bias": 0, "proj": 1}


def repad_query_groups(role: str, full: torch.Tensor, groups_from: int, groups_to: int) -> torch.Tensor:
    """A full Megatron tensor with ``groups_from`` KV groups (real ones first, zero padding after)
    re-laid out with ``groups_to``: padding dropped or zero groups appended. Other roles: unchanged.

    Shape: [g_from * c, ...] -> [g_to * c, ...] along the role's grouped dim (0 for ``linear_qkv``,
    1 for ``linear_proj``), c = rows (columns) per group.
    """
    dim = GROUPED_ROLES.get(role)
    if dim is None or groups_from == groups_to:
        return full
    size = full.shape[dim]
    if size % groups_from:
        raise ValueError(f"{role}: {size} along dim {dim} is not {groups_from} KV groups")
    per = size // groups_from
    keep = full.narrow(dim, 0, min(groups_from, groups_to) * per)
    if groups_to <= groups_from:
        return keep
    shape = list(full.shape)
    shape[dim] = (groups_to - groups_from) * per
    return torch.cat([keep, full.new_zeros(shape)], dim=dim)


def to_engine_hf(arch, spec: ModelSpec, engine: ModelSpec, name: str, role: str,
                 full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pieces of full Megatron tensor ``name`` in the engine's HF model: the
    HF model itself (``Architecture.to_hf``) when the engine runs the real heads, else with the
    engine's zero KV groups (:func:`repad_query_groups`) kept."""
    if engine.num_query_groups == spec.num_query_groups:
        return arch.to_hf(spec, name, full)
    return arch.to_hf(engine, name, repad_query_groups(role, full, spec.megatron_query_groups,
                                                       engine.num_query_groups))
