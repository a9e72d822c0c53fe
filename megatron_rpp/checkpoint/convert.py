"""Offline, streaming HF ⇄ Megatron conversion (no process group, no model built).

Both directions walk the parameters in the fixed order of the architecture's parameter
table (``Architecture.param_table``) and hold one parameter at a time: its HF tensors,
the fused Megatron tensor and its TP shards (views). Output files are written through
:class:`SafetensorsStreamWriter` (header first, then tensor by tensor). Peak memory
beyond the interpreter is therefore ~3× the largest parameter (the embedding for most
LLMs), independent of model size; see benchmarks/bench_convert_memory.py.

Outputs go to a temporary folder beside the destination, renamed into place only when
complete; a failure removes it. An existing destination is an error unless ``overwrite``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from megatron_rpp.checkpoint.format import (
    DTYPE_NAMES,
    DTYPES,
    HF_DTYPE_NAMES,
    HF_FILES_DIR,
    CheckpointError,
    CheckpointMetadata,
    ParamLayout,
    check_output_dir,
    checkpoint_layout,
    copy_hf_side_files,
    publish_output_dir,
    read_metadata,
    shard_file_name,
    temp_output_dir,
    write_metadata,
)
from megatron_rpp.checkpoint.hf_io import INDEX_FILE, HFCheckpointReader, hf_shard_names, plan_hf_shards
from megatron_rpp.checkpoint.safetensors_stream import SafetensorsStreamWriter, read_header, read_tensor
from megatron_rpp.models.spec import load_hf_config
from megatron_rpp.parallel.gather import EMBEDDING_WEIGHT

Log = Callable[[str], None]
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
#: HF tensors that carry no weights of their own (recomputed buffers).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_architecture(hf_config: dict):
    """The registered architecture of a HF config, as a :class:`CheckpointError` when unsupported."""
    from megatron_rpp.algorithms.registry import UnknownNameError
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.spec import UnsupportedConfigError

    try:
        arch = architecture_for_config(hf_config)
        return arch, arch.model_spec(hf_config)
    except (UnknownNameError, UnsupportedConfigError) as e:
        raise CheckpointError(f"unsupported model: {e}") from None


def _hf_config_with_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    cfg = dict(cfg)
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    for key in keys:
        cfg[key] = HF_DTYPE_NAMES[dtype]
    return cfg


# ------------------------------------------------------------------------------ HF -> Megatron


def hf_to_megatron(
    hf_dir: str | Path,
    output_dir: str | Path,
    *,
    tp: int,
    pp: int,
    dtype: str | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> Path:
    """Convert a HF safetensors folder into a megatron_rpp checkpoint at TP=``tp``, PP=``pp``.

    Args:
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; None keeps the source dtype (which
            must then be one of those, and the same for every tensor).
    Returns:
        ``output_dir``.
    """
    hf_dir, output = Path(hf_dir), Path(output_dir)
    log = log or (lambda msg: None)
    check_output_dir(output, overwrite)
    cfg = load_hf_config(hf_dir)
    arch, base_spec = resolve_architecture(cfg)
    spec = base_spec.for_tp(tp)
    layout = checkpoint_layout(arch, spec, tp, pp)
    table = arch.param_table(spec)
    reader = HFCheckpointReader(hf_dir)
    target = _target_dtype(reader, dtype)
    if spec.padded_query_groups:
        log(f"padding KV groups {base_spec.num_query_groups} -> {spec.padded_query_groups} for tp={tp}")
    if spec.padded_vocab_size:
        log(f"padding the vocabulary {spec.vocab_size} -> {spec.padded_vocab_size} for tp={tp}")

    tmp = temp_output_dir(output)
    writers: dict[tuple[int, int], SafetensorsStreamWriter] = {}
    try:
        for s in range(pp):
            for r in range(tp):
                entries = [(p.name, target, p.shard_shape(tp)) for p in layout if (r, s) in p.files(tp)]
                writers[(r, s)] = SafetensorsStreamWriter(tmp / shard_file_name(r, s), entries)
        used: set[str] = set()
        for p in layout:
            hf_names = list(table[p.name].hf_names)
            used.update(hf_names)
            hf_tensors = [reader.get(h) for h in hf_names]
            try:
                full = arch.to_megatron(spec, p.name, hf_tensors)
            except ValueError as e:  # a tensor of the wrong size for the config
                raise CheckpointError(f"{p.name} from {hf_names}: {e}") from None
            if tuple(full.shape) != p.full_shape:
                raise CheckpointError(
                    f"{p.name}: built shape {tuple(full.shape)} from {hf_names}, config implies {p.full_shape}"
                )
            del hf_tensors
            full = full.to(target)
            for r, s in p.files(tp):
                writers[(r, s)].write(p.name, table[p.name].shard(full, tp, r))
            del full
        for w in writers.values():
            w.close()
        _check_all_hf_used(reader, used | table.hf_aliases(), arch.name)
        copy_hf_side_files(hf_dir, tmp / HF_FILES_DIR)
        hf_cfg = _hf_config_with_dtype(cfg, target)
        (tmp / HF_FILES_DIR / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        meta = CheckpointMetadata(arch.name, tp, pp, DTYPE_NAMES[target], hf_cfg, layout)
        write_metadata(tmp, meta)
        publish_output_dir(tmp, output, overwrite)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {output} ({arch.name}, tp={tp}, pp={pp}, {DTYPE_NAMES[target]}, {len(layout)} parameters)")
    return output


def _target_dtype(reader: HFCheckpointReader, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    found = {reader.dtype(n) for n in reader.names() if not n.endswith(_IGNORED_HF_SUFFIXES)}
    if len(found) != 1:
        raise CheckpointError(
            f"source tensors have mixed dtypes {sorted(map(str, found))}; pass an explicit dtype (--dtype)"
        )
    (src,) = found
    if src not in DTYPE_NAMES:
        raise CheckpointError(f"source dtype {src} is not supported; pass --dtype fp32|bf16|fp16")
    return src


def _check_all_hf_used(reader: HFCheckpointReader, used: set[str], architecture: str) -> None:
    left = sorted(n for n in reader.names() if n not in used and not n.endswith(_IGNORED_HF_SUFFIXES))
    if left:
        raise CheckpointError(
            f"{len(left)} HF tensors are not used by the {architecture} mapping (first: {left[0]}); "
            "does config.json describe these weights?"
        )


# ------------------------------------------------------------------------------ Megatron reader


class MegatronCheckpointReader:
    """Read parameters of a megatron_rpp checkpoint, as saved or resharded to any TP.

    Construction checks the whole folder (metadata, file sizes, the metadata's layout
    against the architecture's parameter table, every file's header against the metadata)
    before any weight is read. The saving spec's vocabulary padding is read from the stored
    embedding shape, so checkpoints padded differently (another divisor, or none) load too.
    """

    def __init__(self, ckpt_dir: str | Path):
        from megatron_rpp.models.architectures import get_architecture

        self.dir = Path(ckpt_dir)
        self.meta = read_metadata(self.dir)
        try:
            self.arch = get_architecture(self.meta.architecture)
        except KeyError as e:
            raise CheckpointError(f"{self.dir}: unsupported architecture: {e}") from None
        self.base_spec = self.arch.model_spec(self.meta.hf_config)
        self.layout: dict[str, ParamLayout] = {p.name: p for p in self.meta.params}
        self.spec = self._saving_spec()
        self.table = self.arch.param_table(self.spec)
        self._check_layout()
        self._check_headers()

    def _saving_spec(self):
        """``base_spec.for_tp(tp)`` with the vocabulary rows the checkpoint actually stores."""
        spec = self.base_spec.for_tp(self.meta.tp)
        emb = self.layout.get(EMBEDDING_WEIGHT)
        if emb is None:
            raise CheckpointError(f"{self.dir}: metadata lists no {EMBEDDING_WEIGHT}")
        rows = emb.full_shape[0]
        if rows < spec.vocab_size:
            raise CheckpointError(f"{self.dir}: {EMBEDDING_WEIGHT} has {rows} rows < vocab_size {spec.vocab_size}")
        return replace(spec, padded_vocab_size=rows if rows != spec.vocab_size else None)

    def _check_layout(self) -> None:
        want = checkpoint_layout(self.arch, self.spec, self.meta.tp, self.meta.pp, self.meta.vpp)
        have = list(self.meta.params)
        if [p.name for p in have] != [p.name for p in want]:
            missing = sorted({p.name for p in want} - {p.name for p in have})
            extra = sorted({p.name for p in have} - {p.name for p in want})
            raise CheckpointError(
                f"{self.dir}: metadata parameters differ from the {self.arch.name} parameter table "
                f"(missing: {missing[:3]}, unexpected: {extra[:3]})"
            )
        for h, w in zip(have, want):
            if h != w:
                raise CheckpointError(f"{self.dir}: metadata says {h}, the {self.arch.name} parameter table {w}")

    def _check_headers(self) -> None:
        from megatron_rpp.checkpoint.safetensors_stream import ST_DTYPES

        want_dtype = ST_DTYPES[self.meta.torch_dtype]
        headers = {f: read_header(self.dir / f) for f in self.meta.files}
        for p in self.meta.params:
            for r, s in p.files(self.meta.tp):
                f = shard_file_name(r, s)
                h = headers.get(f, {}).get(p.name)
                if h is None:
                    raise CheckpointError(f"{self.dir}: {p.name} is missing from {f}")
                if tuple(h["shape"]) != p.shard_shape(self.meta.tp):
                    raise CheckpointError(
                        f"{self.dir}: {f}:{p.name} has shape {h['shape']}, metadata says {p.shard_shape(self.meta.tp)}"
                    )
                if h["dtype"] != want_dtype:
                    raise CheckpointError(
                        f"{self.dir}: dtype mismatch: {f}:{p.name} is {h['dtype']}, metadata says {self.meta.dtype}"
                    )

    def read_shard(self, name: str, tp_rank: int) -> torch.Tensor:
        """Parameter ``name`` as stored by saving TP rank ``tp_rank``."""
        p = self.layout[name]
        r = tp_rank if p.partition_dim is not None else 0
        return read_tensor(self.dir / shard_file_name(r, p.stage), name)

    def read_full(self, name: str) -> torch.Tensor:
        """Parameter ``name`` in full (TP=1) layout, with the saving layout's padding."""
        p = self.layout[name]
        if p.partition_dim is None:
            return self.read_shard(name, 0)
        return self.table[name].merge([self.read_shard(name, r) for r in range(self.meta.tp)])

    def read_for(self, name: str, tp: int, tp_rank: int) -> torch.Tensor:
        """This TP rank's shard of ``name`` for a model built from ``base_spec.for_tp(tp)``.

        Where the padding (KV groups, vocabulary) of that spec differs from the saved one,
        the tensor goes through the HF layout, the one canonical form, and is padded anew.
        """
        target_spec = self.base_spec.for_tp(tp)
        src, dst = self.table[name], self.arch.param_table(target_spec)[name]
        if tp == self.meta.tp and src.shape == dst.shape:
            return self.read_shard(name, tp_rank)
        full = self.read_full(name)
        if src.shape != dst.shape:
            full = self.arch.to_megatron(target_spec, name, [t for _, t in self.arch.to_hf(self.spec, name, full)])
        return dst.shard(full, tp, tp_rank)


# ------------------------------------------------------------------------------ Megatron -> HF


def megatron_to_hf(
    megatron_dir: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Log | None = None,
) -> Path:
    """Export a megatron_rpp checkpoint as a HF folder (safetensors, config, tokenizer files)."""
    output = Path(output_dir)
    log = log or (lambda msg: None)
    check_output_dir(output, overwrite)
    ckpt = MegatronCheckpointReader(megatron_dir)
    arch, spec, meta = ckpt.arch, ckpt.spec, ckpt.meta
    dtype = meta.torch_dtype
    # Names and shapes of every HF tensor, without reading weights (meta tensors).
    entries = []
    for p in meta.params:
        for hf_name, t in arch.to_hf(spec, p.name, torch.empty(p.full_shape, dtype=dtype, device="meta")):
            entries.append((hf_name, dtype, tuple(t.shape)))
    shards = plan_hf_shards(entries, max_shard_bytes)
    names = hf_shard_names(len(shards))
    shard_of = {e[0]: i for i, shard in enumerate(shards) for e in shard}

    tmp = temp_output_dir(output)
    writer: SafetensorsStreamWriter | None = None
    try:
        current = -1
        for p in meta.params:
            for hf_name, t in arch.to_hf(spec, p.name, ckpt.read_full(p.name)):
                i = shard_of[hf_name]
                if i != current:
                    if writer is not None:
                        writer.close()
                    current = i
                    writer = SafetensorsStreamWriter(tmp / names[i], shards[i], metadata={"format": "pt"})
                writer.write(hf_name, t)
        if writer is not None:
            writer.close()
        if len(shards) > 1:
            total = sum(
                torch.empty((), dtype=d).element_size() * int(torch.Size(s).numel()) for _, d, s in entries
            )
            index = {"metadata": {"total_size": total}, "weight_map": {n: names[shard_of[n]] for n, _, _ in entries}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        side = ckpt.dir / HF_FILES_DIR
        if side.is_dir():
            copy_hf_side_files(side, tmp)
        (tmp / "config.json").write_text(json.dumps(_hf_config_with_dtype(meta.hf_config, dtype), indent=2))
        publish_output_dir(tmp, output, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {output} ({arch.name}, {len(entries)} tensors in {len(shards)} file(s), {meta.dtype})")
    return output
