"""Load a HF safetensors checkpoint straight into this rank's Megatron shard (streaming).

Each Megatron parameter of this pipeline stage is built from its HF tensors (read one
at a time with ``safe_open``), sliced to this TP rank and copied in; nothing beyond
one full parameter is held at once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_rpp.parallel.gather import global_name, is_gated_fc1, layer_offset, shard_tp
from megatron_rpp.parallel.groups import ParallelGroups


def load_hf_weights(model, groups: ParallelGroups, arch, spec, hf_dir: str | Path) -> None:
    """Fill this rank's shard of ``model`` from the HF checkpoint at ``hf_dir``."""
    from megatron_rpp.checkpoint.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    offset = layer_offset(model)
    with torch.no_grad():
        for local, p in model.named_parameters():
            name = global_name(local, offset)
            if name == "output_layer.weight" and getattr(p, "shared_embedding", False):
                name = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
            hf_names = arch.hf_names_for(spec, name)
            if name == "output_layer.weight" and hf_names[0] not in reader:
                raise KeyError(f"{hf_dir}: untied model without lm_head.weight")
            full = arch.to_megatron(spec, name, [reader.get(h) for h in hf_names])
            if getattr(p, "tensor_model_parallel", False):
                full = shard_tp(full, groups, partition_dim=p.partition_dim, gated=is_gated_fc1(local))
            if full.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shard {tuple(full.shape)} != parameter {tuple(p.shape)}")
            p.copy_(full.to(p.dtype))
