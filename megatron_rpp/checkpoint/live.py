"""Load and save megatron_rpp checkpoints from live Megatron ranks, at any TP/PP.

    spec = arch.model_spec(hf_config).for_tp(groups.tp_size)
    model = build_gpt_model(spec, groups)
    load_megatron_checkpoint(model, groups, "ckpt/")      # saved at any TP/PP
    ...
    save_megatron_checkpoint(model, groups, "out/", hf_config)

Loading reads, per parameter, only the shard files that hold it: this rank's own file
when the TP size matches the saved one, all the saving TP ranks' files (merged, then
re-split) otherwise. Peak extra memory is one full parameter.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rpp.checkpoint.convert import MegatronCheckpointReader, resolve_architecture
from megatron_rpp.checkpoint.format import (
    DTYPE_NAMES,
    HF_FILES_DIR,
    CheckpointError,
    CheckpointMetadata,
    check_output_dir,
    checkpoint_layout,
    copy_hf_side_files,
    publish_output_dir,
    shard_file_name,
    write_metadata,
)
from megatron_rpp.checkpoint.safetensors_stream import SafetensorsStreamWriter
from megatron_rpp.parallel.gather import iter_local_params
from megatron_rpp.parallel.groups import ParallelGroups


def load_megatron_checkpoint(
    model, groups: ParallelGroups, ckpt_dir: str | Path, *, allow_dtype_cast: bool = False
) -> CheckpointMetadata:
    """Fill this rank's shard of ``model`` (one GPTModel or its virtual-pipeline chunks) from
    ``ckpt_dir`` (saved at any TP/PP/VPP).

    ``model`` must be built from ``spec.for_tp(groups.tp_size)`` of the checkpoint's HF
    config. Every parameter this rank owns must be in the checkpoint and every
    checkpoint parameter of this stage must be in the model; shapes must match.

    Args:
        allow_dtype_cast: load a checkpoint whose dtype differs from the model's
            parameters (e.g. bf16 weights into an fp32 model); an error otherwise.
    Returns:
        The checkpoint's metadata.
    """
    ckpt = MegatronCheckpointReader(ckpt_dir)
    meta = ckpt.meta
    expected = {e.name for e in ckpt.table if ckpt.table.stage(e, groups.pp_size, groups.vpp_size) == groups.pp_rank}
    seen: set[str] = set()
    with torch.no_grad():
        for name, p in iter_local_params(model, with_tied_copy=True):
            if name not in ckpt.layout:
                raise CheckpointError(f"{ckpt.dir}: model parameter {name} is not in the checkpoint")
            if p.dtype != meta.torch_dtype and not allow_dtype_cast:
                raise CheckpointError(
                    f"dtype mismatch: checkpoint {ckpt.dir} is {meta.dtype}, model parameter {name} is "
                    f"{p.dtype} (build the model in {meta.dtype} or pass allow_dtype_cast=True)"
                )
            shard = ckpt.read_for(name, groups.tp_size, groups.tp_rank)
            if tuple(shard.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{name}: checkpoint shard {tuple(shard.shape)} != model parameter {tuple(p.shape)} "
                    f"(tp={groups.tp_size}); was the model built from spec.for_tp({groups.tp_size}) of "
                    "this checkpoint's config?"
                )
            p.copy_(shard)
            seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(
            f"{len(missing)} checkpoint parameters of stage {groups.pp_rank} have no model parameter "
            f"(first: {missing[0]}); does the model match the checkpoint's config?"
        )
    return meta


def save_megatron_checkpoint(
    model,
    groups: ParallelGroups,
    ckpt_dir: str | Path,
    hf_config: dict,
    *,
    hf_files_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (this world's TP×PP shards) as a megatron_rpp checkpoint.

    Collective over the whole world (every rank calls it). Data-parallel rank 0 of each
    (TP, PP) coordinate writes its own file; world rank 0 writes the metadata last and
    renames the finished folder into place.

    Args:
        hf_config: the HF config the model was built from (stored for export).
        hf_files_from: a HF folder whose tokenizer/config files are stored alongside,
            so that an export is a complete HF folder.
    """
    out = Path(ckpt_dir)
    world = dist.group.WORLD
    check_output_dir(out, overwrite)  # every rank sees the same filesystem: all raise or none
    arch, base_spec = resolve_architecture(hf_config)
    spec = base_spec.for_tp(groups.tp_size)
    layout = checkpoint_layout(arch, spec, groups.tp_size, groups.pp_size, groups.vpp_size)
    by_name = {p.name: p for p in layout}
    dtype = next(model.parameters()).dtype
    tmp = out.parent / f".{out.name}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=world)

    if groups.dp_rank == 0:
        mine = {}
        for name, p in iter_local_params(model):  # a tied output layer is the embedding: not stored
            entry = by_name.get(name)
            if entry is None:
                raise CheckpointError(f"model parameter {name} is not part of the {arch.name} layout")
            if tuple(p.shape) != entry.shard_shape(groups.tp_size):
                raise CheckpointError(f"{name}: shape {tuple(p.shape)} != {entry.shard_shape(groups.tp_size)}")
            if (groups.tp_rank, groups.pp_rank) in entry.files(groups.tp_size):
                mine[name] = p
        order = [p.name for p in layout if p.name in mine]
        path = tmp / shard_file_name(groups.tp_rank, groups.pp_rank)
        with SafetensorsStreamWriter(path, [(n, dtype, tuple(mine[n].shape)) for n in order]) as w:
            for n in order:
                w.write(n, mine[n].detach())
    dist.barrier(group=world)
    if dist.get_rank() == 0:
        if hf_files_from is not None:
            copy_hf_side_files(Path(hf_files_from), tmp / HF_FILES_DIR)
        (tmp / HF_FILES_DIR).mkdir(exist_ok=True)
        (tmp / HF_FILES_DIR / "config.json").write_text(json.dumps(hf_config, indent=2))
        meta = CheckpointMetadata(arch.name, groups.tp_size, groups.pp_size, DTYPE_NAMES[dtype], dict(hf_config), layout,
                                  vpp=groups.vpp_size)
        write_metadata(tmp, meta)
        publish_output_dir(tmp, out, overwrite)
    dist.barrier(group=world)
    return out
