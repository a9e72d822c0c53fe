"""Reassemble full (TP=1, PP=1 layout) Megatron parameters from this world's shards.

The weight sync to the rollout engine, the HF export and the tests all need the full
tensor of a parameter sharded across tensor-parallel ranks and owned by one pipeline
stage. Megatron marks each sharded parameter with ``tensor_model_parallel`` and
``partition_dim``. One layout needs care: the gated MLP input projection
(``linear_fc1`` = [gate; up]) is sharded as [gate_r; up_r] on TP rank r, so the full
tensor is [gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}], not a plain concatenation.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rpp.parallel.groups import ParallelGroups


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def gather_tp(tensor: torch.Tensor, groups: ParallelGroups, *, partition_dim: int, gated: bool) -> torch.Tensor:
    """All-gather a TP-sharded tensor into its TP=1 layout (on every TP rank).

    Shape: [..., d/tp, ...] -> [..., d, ...] along ``partition_dim``.
    """
    if groups.tp_size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
    dist.all_gather(shards, tensor.contiguous(), group=groups.tp_group)
    return merge_tp_shards(shards, partition_dim=partition_dim, gated=gated)


def merge_tp_shards(shards: list[torch.Tensor], *, partition_dim: int, gated: bool) -> torch.Tensor:
    """The TP=1 layout from the TP ranks' shards (in TP-rank order); pure, no communication.

    Shape: tp x [..., d/tp, ...] -> [..., d, ...] along ``partition_dim``.
    """
    if len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=partition_dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=partition_dim)
    return torch.cat(shards, dim=partition_dim)


def shard_tp(full: torch.Tensor, groups: ParallelGroups, *, partition_dim: int, gated: bool) -> torch.Tensor:
    """This TP rank's slice of a full tensor (the inverse of :func:`gather_tp`)."""
    if groups.tp_size == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=partition_dim)
        g = gate.chunk(groups.tp_size, dim=partition_dim)[groups.tp_rank]
        u = up.chunk(groups.tp_size, dim=partition_dim)[groups.tp_rank]
        return torch.cat([g, u], dim=partition_dim)
    return full.chunk(groups.tp_size, dim=partition_dim)[groups.tp_rank]


def global_name(local_name: str, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` (local index on this stage) -> ``decoder.layers.{i + offset}.x``."""
    prefix = "decoder.layers."
    if not local_name.startswith(prefix):
        return local_name
    idx, rest = local_name[len(prefix):].split(".", 1)
    return f"{prefix}{int(idx) + layer_offset}.{rest}"


def layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


def iter_local_params(model, *, skip_shared_output: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global megatron name, parameter)`` for this stage, in a fixed order.

    The last stage's copy of a tied embedding (``output_layer.weight`` marked
    ``shared_embedding``) is skipped: the first stage owns that weight.
    """
    offset = layer_offset(model)
    for name, p in model.named_parameters():
        if skip_shared_output and name == "output_layer.weight" and getattr(p, "shared_embedding", False):
            continue
        yield global_name(name, offset), p


def gather_full_params(model, groups: ParallelGroups, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of the whole model in TP=1/PP=1 layout, on every rank.

    Meant for tests and small models: it builds a full copy. The weight sync streams
    parameters one bucket at a time instead.
    """
    local: dict[str, torch.Tensor] = {}
    for name, p in iter_local_params(model):
        t = p.main_grad if grads and hasattr(p, "main_grad") and p.main_grad is not None else (p.grad if grads else p)
        if t is None:
            t = torch.zeros_like(p)
        t = t.detach()
        if getattr(p, "tensor_model_parallel", False):
            t = gather_tp(t, groups, partition_dim=p.partition_dim, gated=is_gated_fc1(name))
        local[name] = t.cpu().clone()
    if groups.pp_size == 1:
        return local
    per_stage: list = [None] * groups.pp_size
    dist.all_gather_object(per_stage, local, group=groups.pp_group)
    full: dict[str, torch.Tensor] = {}
    for stage in per_stage:
        full.update(stage)
    return full


def load_full_params(model, groups: ParallelGroups, full: dict[str, torch.Tensor]) -> None:
    """Copy a TP=1/PP=1-layout state (megatron names) into this rank's shards."""
    with torch.no_grad():
        offset = layer_offset(model)
        for name, p in model.named_parameters():
            gname = global_name(name, offset)
            if gname == "output_layer.weight" and getattr(p, "shared_embedding", False):
                gname = "embedding.word_embeddings.weight"
            if gname not in full:
                raise KeyError(f"parameter {gname} missing from the full state")
            t = full[gname]
            if getattr(p, "tensor_model_parallel", False):
                t = shard_tp(t, groups, partition_dim=p.partition_dim, gated=is_gated_fc1(name))
            if t.shape != p.shape:
                raise ValueError(f"{gname}: shard shape {tuple(t.shape)} != parameter shape {tuple(p.shape)}")
            p.copy_(t)
