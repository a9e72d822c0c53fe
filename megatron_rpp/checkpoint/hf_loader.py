"""Load a HF safetensors checkpoint straight into this rank's Megatron shard (streaming).

Each Megatron parameter of this pipeline stage is built from its HF tensors (read one at a
time with ``safe_open``) through the architecture's parameter table, sliced to this TP
rank and copied in; nothing beyond one full parameter is held at once. The last stage's
copy of a tied embedding is filled from the embedding's HF tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_rpp.parallel.gather import iter_local_params
from megatron_rpp.parallel.groups import ParallelGroups


def load_hf_weights(model, groups: ParallelGroups, arch, spec, hf_dir: str | Path, *,
                    skip_roles: tuple[str, ...] = ()) -> None:
    """Fill this rank's shard of ``model`` (built from ``spec``) from the HF checkpoint at ``hf_dir``.

    ``skip_roles``: parameter-table roles left as built (e.g. ``("score",)``: a new value head on a
    causal LM's trunk, whose folder has no ``score.weight``)."""
    from megatron_rpp.checkpoint.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    table = arch.param_table(spec)
    with torch.no_grad():
        for name, p in iter_local_params(model, with_tied_copy=True):
            entry = table[name]
            if entry.role in skip_roles:
                continue
            full = arch.to_megatron(spec, name, [reader.get(h) for h in entry.hf_names])
            shard = entry.shard(full, groups.tp_size, groups.tp_rank)
            if shard.shape != p.shape:
                raise ValueError(f"{name}: checkpoint shard {tuple(shard.shape)} != parameter {tuple(p.shape)}")
            p.copy_(shard.to(p.dtype))
