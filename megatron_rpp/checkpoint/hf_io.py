"""Read a Hugging Face safetensors folder tensor by tensor; plan the shards of a HF export."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from megatron_rpp.checkpoint.format import CheckpointError
from megatron_rpp.checkpoint.safetensors_stream import read_header, read_tensor, tensor_nbytes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFCheckpointReader:
    """Tensor-by-tensor access to ``model.safetensors`` or an indexed set of shards.

    Every file the index names is checked up front (present, and as long as its header
    says). Each :meth:`get` opens the file, copies out one tensor and unmaps the file, so
    memory holds only the tensors the caller keeps.
    """

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise CheckpointError(f"HF folder {self.hf_dir} does not exist")
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            if not weight_map:
                raise CheckpointError(f"{index} has an empty weight_map")
        elif (self.hf_dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in self.hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
            hint = f" (found {', '.join(found)}: only safetensors are read)" if found else ""
            raise CheckpointError(f"{self.hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.headers: dict[str, dict] = {}
        for fname in files:
            p = self.hf_dir / fname
            if not p.is_file():
                raise CheckpointError(f"{self.hf_dir}: shard {fname} listed in {INDEX_FILE} is missing")
            try:
                self.headers[fname] = read_header(p)
            except (ValueError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.hf_dir}: shard {fname} is unreadable: {e}") from None
        self.file_of: dict[str, str] = {}
        for fname, header in self.headers.items():
            for name in header:
                self.file_of[name] = fname
        if weight_map:
            missing = sorted(n for n, f in weight_map.items() if self.file_of.get(n) != f)
            if missing:
                raise CheckpointError(
                    f"{self.hf_dir}: {len(missing)} tensors listed in {INDEX_FILE} are not in their shard "
                    f"(first: {missing[0]}); partial checkpoint?"
                )

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def dtype(self, name: str) -> torch.dtype:
        st = self.headers[self.file_of[name]][name]["dtype"]
        if st not in _ST_TO_TORCH:
            raise CheckpointError(f"{name}: dtype {st} is not a floating type this converter reads")
        return _ST_TO_TORCH[st]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint")
        return read_tensor(self.hf_dir / self.file_of[name], name)


def plan_hf_shards(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Group ``entries`` (in order) into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = tensor_nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def hf_shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
