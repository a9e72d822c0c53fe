"""The megatron_rpp sharded checkpoint format (``megatron_rpp.sharded_safetensors`` v1).

A checkpoint is a folder::

    megatron_checkpoint.json            metadata; written last (its presence = complete)
    model-tp00-pp00.safetensors         one file per (TP rank, PP stage) of the saving layout
    model-tp01-pp00.safetensors
    ...
    hf/                                 config.json, generation config, tokenizer, chat template

Each shard file holds that rank's Megatron parameter shards under their *global*
Megatron names (``decoder.layers.{global index}...``), in the fixed order of the
architecture's parameter table (``Architecture.param_table``), which also gives each
parameter's TP split: Megatron's own layout, column-parallel weights split along dim 0,
row-parallel along dim 1, the gated ``linear_fc1`` as [gate_r; up_r] per rank, norms and a
reward model's scalar head replicated (stored once, in the TP-rank-0 file). A tied output
layer is not stored (it is the embedding).

The metadata holds the HF config, architecture, TP, PP, dtype, every parameter's full
shape / stage / split, and every file's size, so a loader can check the folder before
it reads a byte of weights, and reshard to any TP/PP (:mod:`megatron_rpp.checkpoint.live`).

Padding (``ModelSpec.for_tp``; exact, see there): when TP does not divide the KV groups,
the model is built (and the checkpoint stored) with zero KV groups appended; the
vocabulary is padded with zero rows to a multiple of 128 x TP (Megatron's
``make_vocab_size_divisible_by``). ``metadata.params`` shapes include the padding of the
saving TP; readers take the vocabulary padding from there, re-pad through the HF layout
when loading at another TP, and HF exports drop it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_rpp.models.spec import ModelSpec
from megatron_rpp.parallel.gather import tp_shard_shape

FORMAT_NAME = "megatron_rpp.sharded_safetensors"
FORMAT_VERSION = 1
METADATA_FILE = "megatron_checkpoint.json"
HF_FILES_DIR = "hf"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
HF_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


class CheckpointError(ValueError):
    """A checkpoint (or conversion request) is invalid; the message says what and where."""


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def validate_layout(spec: ModelSpec, tp: int, pp: int) -> None:
    """Raise :class:`CheckpointError` unless ``spec`` can be split into TP=``tp`` × PP=``pp``.

    ``spec`` is the spec as built (``for_tp(tp)``: KV groups and vocabulary padded).
    """
    if tp < 1 or pp < 1:
        raise CheckpointError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    checks = [
        ("num_attention_heads (after KV-group padding)", spec.megatron_attention_heads, tp, "tensor_parallel_size"),
        ("num_key_value_heads (after KV-group padding)", spec.megatron_query_groups, tp, "tensor_parallel_size"),
        ("intermediate_size", spec.ffn_hidden_size, tp, "tensor_parallel_size"),
        ("vocab_size (after padding)", spec.megatron_vocab_size, tp, "tensor_parallel_size"),
        ("num_hidden_layers", spec.num_layers, pp, "pipeline_parallel_size"),
    ]
    bad = [f"{what}={val} is not divisible by {by_name}={by}" for what, val, by, by_name in checks if val % by]
    if bad:
        raise CheckpointError("cannot split the model at tp=%d, pp=%d: %s" % (tp, pp, "; ".join(bad)))


@dataclass(frozen=True)
class ParamLayout:
    """Where one Megatron parameter lives in a checkpoint."""

    name: str
    stage: int
    full_shape: tuple[int, ...]
    partition_dim: int | None
    gated: bool

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        return tp_shard_shape(self.full_shape, self.partition_dim, tp)

    def files(self, tp: int) -> list[tuple[int, int]]:
        """``(tp_rank, stage)`` of the files holding this parameter (one if replicated)."""
        return [(0, self.stage)] if self.partition_dim is None else [(r, self.stage) for r in range(tp)]


def checkpoint_layout(arch, spec: ModelSpec, tp: int, pp: int, vpp: int = 1) -> list[ParamLayout]:
    """Every stored parameter of ``spec`` (as built at ``tp``) at TP=``tp``, PP=``pp`` (and ``vpp``
    virtual-pipeline chunks per stage: a stage's file then holds its interleaved layers), in the table's order."""
    validate_layout(spec, tp, pp * vpp)
    table = arch.param_table(spec)
    return [ParamLayout(e.name, table.stage(e, pp, vpp), e.shape, e.partition_dim, e.gated) for e in table]


@dataclass
class CheckpointMetadata:
    """Contents of ``megatron_checkpoint.json``."""

    architecture: str
    tp: int
    pp: int
    dtype: str
    hf_config: dict[str, Any]
    params: list[ParamLayout]
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes
    vpp: int = 1  # virtual-pipeline chunks per stage of the saving layout (absent in older files: 1)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> str:
        d = asdict(self)
        d["params"] = [asdict(p) for p in self.params]
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CheckpointMetadata":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: metadata is not valid JSON ({e})") from None
        if d.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: not a {FORMAT_NAME} checkpoint (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: format version {d.get('format_version')} is not supported (supported: {FORMAT_VERSION})"
            )
        if d.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: dtype {d.get('dtype')!r} not one of {sorted(DTYPES)}")
        d["params"] = [
            ParamLayout(p["name"], p["stage"], tuple(p["full_shape"]), p["partition_dim"], p["gated"])
            for p in d["params"]
        ]
        return cls(**d)


def write_metadata(ckpt_dir: Path, meta: CheckpointMetadata) -> None:
    """Record every file's size, then write the metadata (atomically, last)."""
    meta.files = {
        shard_file_name(r, s): (ckpt_dir / shard_file_name(r, s)).stat().st_size
        for s in range(meta.pp)
        for r in range(meta.tp)
    }
    tmp = ckpt_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(meta.to_json())
    os.replace(tmp, ckpt_dir / METADATA_FILE)


def read_metadata(ckpt_dir: str | Path) -> CheckpointMetadata:
    """Read and check a checkpoint folder: metadata present, every shard file present and whole."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"Megatron checkpoint folder {ckpt_dir} does not exist")
    mpath = ckpt_dir / METADATA_FILE
    if not mpath.is_file():
        raise CheckpointError(
            f"{ckpt_dir} has no {METADATA_FILE}: not a megatron_rpp checkpoint, or an incomplete one"
        )
    meta = CheckpointMetadata.from_json(mpath.read_text(), str(mpath))
    for fname, size in meta.files.items():
        p = ckpt_dir / fname
        if not p.is_file():
            raise CheckpointError(f"{ckpt_dir}: shard file {fname} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(
                f"{ckpt_dir}: shard file {fname} is {p.stat().st_size} bytes, metadata says {size} "
                "(truncated or modified)"
            )
    return meta


# ----------------------------------------------------------------------------- output folders


def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise CheckpointError(f"output folder {output} already exists (pass --overwrite to replace it)")


def temp_output_dir(output: Path) -> Path:
    """A fresh temporary folder beside ``output`` (same filesystem, so the final rename is atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_output_dir(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move a finished ``tmp`` to ``output`` (replacing it when ``overwrite``)."""
    if output.exists():
        if not overwrite:
            raise CheckpointError(f"output folder {output} appeared during the conversion; not replacing it")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def copy_hf_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, chat template etc. (every top-level non-weight file)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied
