"""Megatron's tensor-parallel layout of a parameter, and full parameters from this world's shards.

The one TP split/merge pair (:func:`tp_shard` / :func:`merge_tp`, pure) serves the
converter, the checkpoint reader, live loading, the weight sync and the tests. One layout
needs care: a gated MLP input projection (``linear_fc1`` = [gate; up]) is sharded as
[gate_r; up_r] on TP rank r, so the full tensor is [gate_0 .. gate_{tp-1}; up_0 .. up_{tp-1}],
not a plain concatenation. Which parameters are split along which dim, and which are gated,
is the architecture's parameter table (``models/architectures/table.py``); the model
provider stamps ``tp_gated`` on every parameter from it, next to Megatron's own
``tensor_model_parallel`` / ``partition_dim``.

Model naming (:func:`iter_local_params`): Megatron names a stage's layers with local
indices; these helpers use global ones (``decoder.layers.{global index}...``), in the
canonical (local layer spec) naming scheme whatever spec the model was built with (a
Transformer-Engine model's ``linear_qkv.layer_norm_weight`` is ``input_layernorm.weight``
here: the provider stamps the renaming on the model, ``megatron_rpp_canonical``). The last
stage's copy of a tied embedding (``output_layer.weight`` marked ``shared_embedding``) is
the embedding: it goes by the embedding's name, here and only here. A *model* is one
GPTModel or the list of a stage's virtual-pipeline chunks (each possibly DDP-wrapped).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rpp.parallel.groups import ParallelGroups

#: Megatron's name of the (vocab-parallel) input embedding; a tied output layer is a copy of it.
EMBEDDING_WEIGHT = "embedding.word_embeddings.weight"


# ----------------------------------------------------------------------------- pure layout


def tp_shard_shape(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    """One TP rank's shard shape of a full ``shape`` split along ``dim`` (None: replicated)."""
    if dim is None:
        return tuple(shape)
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def tp_shard(full: torch.Tensor, tp: int, rank: int, dim: int | None, gated: bool) -> torch.Tensor:
    """TP rank ``rank``'s shard of a full tensor, in Megatron's layout (a view unless gated).

    Shape: [.., d, ..] -> [.., d/tp, ..] along ``dim``; replicated (``dim`` None) -> full.
    """
    if dim is None or tp == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def merge_tp(shards: list[torch.Tensor], dim: int | None, gated: bool) -> torch.Tensor:
    """The full tensor from the TP ranks' shards (in TP-rank order): the inverse of :func:`tp_shard`.

    Shape: tp x [.., d/tp, ..] -> [.., d, ..] along ``dim``; replicated -> the first shard.
    """
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def gather_tp(tensor: torch.Tensor, groups: ParallelGroups, *, partition_dim: int, gated: bool) -> torch.Tensor:
    """All-gather a TP-sharded tensor into its TP=1 layout (on every TP rank).

    Shape: [..., d/tp, ...] -> [..., d, ...] along ``partition_dim``.
    """
    if groups.tp_size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
    dist.all_gather(shards, tensor.contiguous(), group=groups.tp_group)
    return merge_tp(shards, partition_dim, gated)


# ----------------------------------------------------------------------------- model naming


def global_name(local_name: str, layer_offset: int, rename: dict[str, str] | None = None) -> str:
    """``decoder.layers.{i}.x`` (local index on this stage) -> ``decoder.layers.{i + offset}.x``;
    ``rename`` maps names (layer-relative ``x`` for layer parameters) onto another scheme."""
    prefix = "decoder.layers."
    rename = rename or {}
    if not local_name.startswith(prefix):
        return rename.get(local_name, local_name)
    idx, rest = local_name[len(prefix):].split(".", 1)
    return f"{prefix}{int(idx) + layer_offset}.{rename.get(rest, rest)}"


def model_chunks(model) -> list:
    """The GPTModels of a model: ``[model]``, or a stage's virtual-pipeline chunks in chunk
    order; DDP / Float16Module wrappers removed."""
    out = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        out.append(chunk)
    return out


def layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if not layers:
        return 0
    return layers[0].layer_number - 1


def iter_local_params(model, *, with_tied_copy: bool = False) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(global canonical megatron name, parameter)`` for this stage, in a fixed order.

    The last stage's copy of a tied embedding is named as the embedding
    (:data:`EMBEDDING_WEIGHT`) and skipped unless ``with_tied_copy`` (the first stage owns
    that weight; loaders fill the copy too).
    """
    for chunk in model_chunks(model):
        offset, rename = layer_offset(chunk), getattr(chunk, "megatron_rpp_canonical", None)
        for name, p in chunk.named_parameters():
            if name == "output_layer.weight" and getattr(p, "shared_embedding", False):  # the tied copy
                if with_tied_copy:
                    yield EMBEDDING_WEIGHT, p
                continue
            yield global_name(name, offset, rename), p


def _tp_layout(name: str, p: torch.nn.Parameter) -> tuple[int | None, bool]:
    """(partition dim or None, gated) of a live parameter, from Megatron's and the provider's marks."""
    if not getattr(p, "tensor_model_parallel", False):
        return None, False
    if not hasattr(p, "tp_gated"):
        raise ValueError(f"{name}: no tp_gated mark (build the model with megatron_rpp.models.provider.build_gpt_model)")
    return p.partition_dim, p.tp_gated


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
        dim, gated = _tp_layout(name, p)
        if dim is not None:
            t = gather_tp(t, groups, partition_dim=dim, gated=gated)
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
        for name, p in iter_local_params(model, with_tied_copy=True):
            if name not in full:
                raise KeyError(f"parameter {name} missing from the full state")
            dim, gated = _tp_layout(name, p)
            t = tp_shard(full[name], groups.tp_size, groups.tp_rank, dim, gated)
            if t.shape != p.shape:
                raise ValueError(f"{name}: shard shape {tuple(t.shape)} != parameter shape {tuple(p.shape)}")
            p.copy_(t)
