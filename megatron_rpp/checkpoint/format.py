"""The megatron_rpp sharded checkpoint format (``megatron_rpp.sharded_safetensors`` v1).

A checkpoint is a folder::

    megatron_checkpoint.json            metadata; written last (its presence = complete)
    model-tp00-pp00.safetensors         one file per (TP rank, PP stage) of the saving layout
    model-tp01-pp00.safetensors
    ...
    hf/                                 config.json, generation config, tokenizer, chat template

Each shard file holds that rank's Megatron parameter shards under their *global*
Megatron names (``decoder.layers.{global index}...``), in the fixed order of
``Architecture.megatron_param_names``. TP shards follow Megatron's own layout (see
:data:`TP_RULES`): column-parallel weights split along dim 0, row-parallel along dim 1,
the gated ``linear_fc1`` as [gate_r; up_r] per rank, norms and a reward model's scalar
head replicated (stored once, in the TP-rank-0 file). A tied output layer is not stored (it is the embedding).

The metadata holds the HF config, architecture, TP, PP, dtype, every parameter's full
shape / stage / split, and every file's size, so a loader can check the folder before
it reads a byte of weights, and reshard to any TP/PP (:mod:`megatron_rpp.checkpoint.live`).

Attention heads: when TP does not divide the KV groups, the model is built (and the
checkpoint stored) with zero KV groups appended (``ModelSpec.for_tp``; exact, see there);
``metadata.params`` shapes include that padding, HF exports drop it.
Vocabulary: no padding is done. TP must divide ``vocab_size`` (padded rows would add
logits that every consumer would have to mask); ``validate_layout`` says so.
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

#: Megatron parameter suffix -> (TP partition dim or None for replicated, gated [gate; up]).
TP_RULES: dict[str, tuple[int | None, bool]] = {
    "embedding.word_embeddings.weight": (0, False),  # vocab-parallel
    "output_layer.weight": (0, False),  # vocab-parallel
    "output_layer.score.weight": (None, False),  # a reward model's scalar head [1, h]: replicated
    "self_attention.linear_qkv.weight": (0, False),  # column-parallel (whole KV groups per rank)
    "self_attention.linear_qkv.bias": (0, False),
    "self_attention.linear_proj.weight": (1, False),  # row-parallel
    "mlp.linear_fc1.weight": (0, True),  # column-parallel, [gate_r; up_r] per rank
    "mlp.linear_fc2.weight": (1, False),  # row-parallel
    "input_layernorm.weight": (None, False),
    "pre_mlp_layernorm.weight": (None, False),
    "self_attention.q_layernorm.weight": (None, False),
    "self_attention.k_layernorm.weight": (None, False),
    "decoder.final_layernorm.weight": (None, False),
}


class CheckpointError(ValueError):
    """A checkpoint (or conversion request) is invalid; the message says what and where."""


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def tp_rule(name: str) -> tuple[int | None, bool]:
    """``(partition_dim or None, gated)`` of a (global or local) Megatron parameter name."""
    for suffix, rule in TP_RULES.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    raise CheckpointError(f"no tensor-parallel rule for Megatron parameter {name!r}")


def split_tp(full: torch.Tensor, tp: int, dim: int | None, gated: bool) -> list[torch.Tensor]:
    """The ``tp`` shards of a full tensor, Megatron's layout (views; no copy).

    Shape: [.., d, ..] -> tp × [.., d/tp, ..] along ``dim``; replicated (``dim`` None) -> tp × full.
    """
    if dim is None or tp == 1:
        return [full] * tp
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return [torch.cat([g, u], dim=dim) for g, u in zip(gate.chunk(tp, dim=dim), up.chunk(tp, dim=dim))]
    return list(full.chunk(tp, dim=dim))


def merge_tp(shards: list[torch.Tensor], dim: int | None, gated: bool) -> torch.Tensor:
    """The inverse of :func:`split_tp`."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def full_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """Full (TP=1) shape of Megatron parameter ``name``, from the architecture spec alone."""
    h, f, v, d = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size, spec.kv_channels
    n, g = spec.megatron_attention_heads, spec.megatron_query_groups  # incl. KV-group padding
    shapes = {
        "embedding.word_embeddings.weight": (v, h),
        "output_layer.weight": (v, h),
        "output_layer.score.weight": (spec.num_labels, h),
        "decoder.final_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((n + 2 * g) * d, h),
        "self_attention.linear_qkv.bias": ((n + 2 * g) * d,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, n * d),
        "mlp.linear_fc1.weight": (2 * f, h),
        "mlp.linear_fc2.weight": (h, f),
    }
    for suffix, shape in shapes.items():
        if name == suffix or name.endswith("." + suffix):
            return shape
    raise CheckpointError(f"unknown Megatron parameter {name!r}")


def stage_of(spec: ModelSpec, name: str, pp: int) -> int:
    """The pipeline stage owning ``name`` (Megatron's even split of layers over stages)."""
    if name.startswith("embedding."):
        return 0
    if name.startswith("decoder.layers."):
        layer = int(name.split(".")[2])
        return layer // (spec.num_layers // pp)
    return pp - 1  # final norm, output layer


def validate_layout(spec: ModelSpec, tp: int, pp: int) -> None:
    """Raise :class:`CheckpointError` unless ``spec`` can be split into TP=``tp`` × PP=``pp``."""
    if tp < 1 or pp < 1:
        raise CheckpointError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    checks = [
        ("num_attention_heads (after KV-group padding)", spec.megatron_attention_heads, tp, "tensor_parallel_size"),
        ("num_key_value_heads (after KV-group padding)", spec.megatron_query_groups, tp, "tensor_parallel_size"),
        ("intermediate_size", spec.ffn_hidden_size, tp, "tensor_parallel_size"),
        ("vocab_size", spec.vocab_size, tp, "tensor_parallel_size"),
        ("num_hidden_layers", spec.num_layers, pp, "pipeline_parallel_size"),
    ]
    bad = [f"{what}={val} is not divisible by {by_name}={by}" for what, val, by, by_name in checks if val % by]
    if bad:
        raise CheckpointError(
            "cannot split the model at tp=%d, pp=%d: %s. (No vocabulary padding is done: "
            "tp must divide vocab_size exactly.)" % (tp, pp, "; ".join(bad))
        )


@dataclass(frozen=True)
class ParamLayout:
    """Where one Megatron parameter lives in a checkpoint."""

    name: str
    stage: int
    full_shape: tuple[int, ...]
    partition_dim: int | None
    gated: bool

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        if self.partition_dim is None:
            return self.full_shape
        s = list(self.full_shape)
        s[self.partition_dim] //= tp
        return tuple(s)

    def files(self, tp: int) -> list[tuple[int, int]]:
        """``(tp_rank, stage)`` of the files holding this parameter (one if replicated)."""
        return [(0, self.stage)] if self.partition_dim is None else [(r, self.stage) for r in range(tp)]


def checkpoint_layout(arch, spec: ModelSpec, tp: int, pp: int) -> list[ParamLayout]:
    """Every stored parameter of ``spec`` at TP=``tp``, PP=``pp``, in the fixed order."""
    validate_layout(spec, tp, pp)
    out = []
    for name in arch.megatron_param_names(spec):
        dim, gated = tp_rule(name)
        out.append(ParamLayout(name, stage_of(spec, name, pp), full_shape(spec, name), dim, gated))
    return out


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
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def param(self, name: str) -> ParamLayout:
        for p in self.params:
            if p.name == name:
                return p
        raise CheckpointError(f"parameter {name!r} is not in the checkpoint")

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
