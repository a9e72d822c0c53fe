"""Weight sync: this world's Megatron TP/PP shards -> HF-named full tensors -> the local engine.

Every rank holds a colocated engine (one per rank, engine TP = 1, or one engine per
TP group with ``external_launcher``), and every engine needs *every* parameter in full.
So each parameter travels from the pipeline stage that owns it to all stages, and is
reassembled from its TP shards on every rank.

Per bucket (consecutive parameters of one owning stage, at most ``bucket_bytes`` in the
engine dtype; a single larger tensor goes alone):

1. every rank allocates the bucket, [tp, bucket/tp] in the engine dtype; the owning
   stage's ranks cast their shards into their own row;
2. with PP > 1 that row is broadcast over the pipeline group from the owning stage
   (every pipeline group carries its own TP slice, so inter-stage traffic is 1/tp of
   the bucket per link);
3. an in-place all-gather of the rows over the TP group (intra-node link);
4. each parameter is reassembled lazily (``ParamEntry.merge``, incl. the gated
   ``linear_fc1`` layout), converted by ``Architecture.to_hf`` (the parameter table: names
   and layouts, e.g. grouped QKV -> q/k/v; KV-group and vocabulary padding dropped, so the
   engine sees exactly the HF tensors) and yielded to the engine.

The whole sync is one generator consumed by one ``engine.update_weights`` call (vLLM
buffers a layer until all its tensors arrived, see ``vllm_engine``), so communication
runs lazily as the engine loads. Peak extra memory: one gathered bucket (shards are
packed straight into this rank's row of it, and the collectives work in place) plus the
parameter being reassembled — never a model copy. All ranks run the same collectives in
the same order (the parameter table's), so the sync cannot deadlock on ordering.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rpp.models.spec import ModelSpec
from megatron_rpp.parallel.gather import iter_local_params, merge_tp
from megatron_rpp.parallel.groups import ParallelGroups


class WeightSyncError(RuntimeError):
    """The Megatron model and the architecture's parameter list disagree."""


@dataclass(frozen=True)
class ParamSlot:
    """Where a Megatron parameter lives and how its shards reassemble.

    Shape: shard_shape is one TP rank's shard (the full shape when not TP-sharded).
    """

    name: str
    stage: int
    shard_shape: tuple[int, ...]
    tp_sharded: bool
    partition_dim: int
    gated: bool = False
    """TP shards are [gate_r; up_r] (``linear_fc1``)."""

    @property
    def shard_numel(self) -> int:
        n = 1
        for d in self.shard_shape:
            n *= d
        return n

    def full_numel(self, tp: int) -> int:
        return self.shard_numel * (tp if self.tp_sharded else 1)


@dataclass(frozen=True)
class Bucket:
    """Consecutive parameters owned by one stage, moved with one broadcast and one all-gather."""

    stage: int
    slots: tuple[ParamSlot, ...]
    shard_numel: int
    """Elements per TP rank (the packed buffer's length)."""
    nbytes: int
    """Full (all TP ranks) bytes in the engine dtype."""


@dataclass
class SyncStats:
    """What one sync moved and how long it took (this rank's view)."""

    bytes: int = 0
    """Full-tensor bytes handed to the engine (engine dtype)."""
    buckets: int = 0
    tensors: int = 0
    """HF tensors handed to the engine."""
    max_bucket_bytes: int = 0
    seconds: float = 0.0
    """Wall time of the whole sync (gather + convert + engine load)."""
    gather_seconds: float = 0.0
    """Time inside the generator: pack, broadcast, all-gather, reassemble, convert."""


def build_plan(model, groups: ParallelGroups, spec: ModelSpec, arch) -> list[ParamSlot]:
    """Every parameter of the full model, from the parameter table ``arch.param_table(spec)``.

    Names, owning stages, shard shapes and TP layouts come from the table; each rank checks
    its own stage's parameters against it, and the verdicts are exchanged over the pipeline
    group, so every rank raises (or none does).

    Raises:
        WeightSyncError: when this world's parameters and the table differ (a mapping that
            would silently skip or invent a tensor, or a model built from another spec).
    """
    table = arch.param_table(spec)
    tp, pp = groups.tp_size, groups.pp_size
    slots = [
        ParamSlot(e.name, table.stage(e, pp), e.shard_shape(tp), e.partition_dim is not None and tp > 1,
                  -1 if e.partition_dim is None else e.partition_dim, e.gated)
        for e in table
    ]
    problem = _check_stage(model, slots, groups.pp_rank, arch.name)
    problems: list = [problem]
    if pp > 1:
        problems = [None] * pp
        dist.all_gather_object(problems, problem, group=groups.pp_group)
    found = [p for p in problems if p]
    if found:
        raise WeightSyncError(found[0])
    return slots


def _check_stage(model, slots: list[ParamSlot], stage: int, arch_name: str) -> str | None:
    """Why this stage's parameters do not match the table's slots of ``stage`` (None when they do)."""
    local = {name: p for name, p in iter_local_params(_unwrap(model))}
    mine = {s.name: s for s in slots if s.stage == stage}
    missing, extra = sorted(set(mine) - set(local)), sorted(set(local) - set(mine))
    if missing or extra:
        return (f"{arch_name}: Megatron model and parameter table disagree on stage {stage}; "
                f"missing from the model: {missing[:5]}, not in the table: {extra[:5]}")
    for name, p in local.items():
        s = mine[name]
        if tuple(p.shape) != s.shard_shape:
            return (f"{name}: model shard {tuple(p.shape)} != table {s.shard_shape}; was the model built "
                    "from this spec (spec.for_tp(tp))?")
    return None


def plan_buckets(slots: list[ParamSlot], *, tp: int, element_size: int, bucket_bytes: int) -> list[Bucket]:
    """Group consecutive slots of the same stage into buckets of at most ``bucket_bytes``.

    A parameter larger than ``bucket_bytes`` gets a bucket of its own (the engine takes
    whole tensors). Pure: same input, same buckets on every rank.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[Bucket] = []
    cur: list[ParamSlot] = []

    def close() -> None:
        if cur:
            buckets.append(
                Bucket(
                    stage=cur[0].stage,
                    slots=tuple(cur),
                    shard_numel=sum(s.shard_numel for s in cur),
                    nbytes=sum(s.full_numel(tp) for s in cur) * element_size,
                )
            )
            cur.clear()

    cur_bytes = 0
    for slot in slots:
        nbytes = slot.full_numel(tp) * element_size
        if cur and (slot.stage != cur[0].stage or cur_bytes + nbytes > bucket_bytes):
            close()
            cur_bytes = 0
        cur.append(slot)
        cur_bytes += nbytes
    close()
    return buckets


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _pack_local(bucket: Bucket, params: dict[str, torch.Tensor], out: torch.Tensor) -> None:
    """Copy this rank's shards of ``bucket`` (cast to ``out``'s dtype) into ``out``. Shape: [bucket.shard_numel]."""
    off = 0
    for slot in bucket.slots:
        n = slot.shard_numel
        out[off:off + n].copy_(params[slot.name].detach().reshape(-1))
        off += n


def _all_gather_rows(rows: torch.Tensor, groups: ParallelGroups) -> None:
    """In place over the TP group: row r <- TP rank r's row. Shape: rows [tp, n]."""
    if dist.get_backend(groups.tp_group) == "gloo":
        # gloo's all-gather stages the whole output in a temporary (one more bucket);
        # one broadcast per rank straight into its row does not.
        for r, src in enumerate(groups.tp_ranks):
            dist.broadcast(rows[r], src=src, group=groups.tp_group)
    else:  # NCCL: in-place all-gather (the input is this rank's slice of the output)
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(rows.view(-1), rows[groups.tp_rank], group=groups.tp_group)


def _move_bucket(bucket: Bucket, params, groups: ParallelGroups, dtype, device) -> torch.Tensor:
    """Steps 1-3 of the module doc, in one buffer. Returns the gathered bucket, shape [tp, bucket.shard_numel]."""
    rows = torch.empty(groups.tp_size, bucket.shard_numel, dtype=dtype, device=device)
    mine = rows[groups.tp_rank]
    if groups.pp_rank == bucket.stage:
        _pack_local(bucket, params, mine)
    if groups.pp_size > 1:
        dist.broadcast(mine, src=groups.pp_ranks[bucket.stage], group=groups.pp_group)
    if groups.tp_size > 1:
        _all_gather_rows(rows, groups)
    return rows


def iter_hf_tensors(
    model,
    groups: ParallelGroups,
    spec: ModelSpec,
    arch,
    *,
    dtype: torch.dtype,
    bucket_bytes: int,
    stats: SyncStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor in dtype)`` for the whole model, on every rank (collective).

    Every rank must consume the iterator to the end: it runs collectives as it goes.
    """
    stats = stats if stats is not None else SyncStats()
    t0 = time.perf_counter()
    slots = build_plan(model, groups, spec, arch)
    params = dict(iter_local_params(_unwrap(model)))
    device = next(iter(params.values())).device
    element_size = torch.empty((), dtype=dtype).element_size()
    buckets = plan_buckets(slots, tp=groups.tp_size, element_size=element_size, bucket_bytes=bucket_bytes)
    stats.gather_seconds += time.perf_counter() - t0
    for bucket in buckets:
        t0 = time.perf_counter()
        gathered = _move_bucket(bucket, params, groups, dtype, device)
        stats.buckets += 1
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, bucket.nbytes)
        stats.gather_seconds += time.perf_counter() - t0
        off = 0
        for slot in bucket.slots:
            t0 = time.perf_counter()
            n = slot.shard_numel
            rows = gathered if slot.tp_sharded else gathered[:1]
            shards = [r[off:off + n].view(slot.shard_shape) for r in rows]
            off += n
            if len(bucket.slots) == 1 and slot.tp_sharded and slot.partition_dim == 0 and not slot.gated:
                # The gathered rows already are the full tensor (e.g. the vocab-parallel embedding): no copy.
                full = gathered.view(slot.shard_shape[0] * groups.tp_size, *slot.shard_shape[1:])
            else:
                full = merge_tp(shards, slot.partition_dim if slot.tp_sharded else None, slot.gated)
            pieces = arch.to_hf(spec, slot.name, full)
            del shards, full
            stats.gather_seconds += time.perf_counter() - t0
            for hf_name, tensor in pieces:
                stats.bytes += tensor.numel() * tensor.element_size()
                stats.tensors += 1
                yield hf_name, tensor
            del pieces
        del gathered


def sync_weights(
    model,
    groups: ParallelGroups,
    spec: ModelSpec,
    arch,
    engine,
    *,
    bucket_bytes: int = 256 << 20,
    dtype: torch.dtype | None = None,
) -> SyncStats:
    """Push this world's current Megatron weights into ``engine`` (collective over the world).

    Args:
        model: this rank's Megatron model shard (DDP/Float16 wrappers are unwrapped).
        spec, arch: the ``ModelSpec`` the model was built from and its ``Architecture``.
        engine: this rank's :class:`RolloutEngine` (its ``dtype`` attribute, if any, is
            the target dtype unless ``dtype`` is given).
        bucket_bytes: bound on the bytes gathered at once (engine dtype).

    Returns:
        :class:`SyncStats` for this rank.
    """
    dtype = dtype or getattr(engine, "dtype", None) or next(_unwrap(model).parameters()).dtype
    stats = SyncStats()
    t0 = time.perf_counter()
    with torch.no_grad():
        engine.update_weights(
            iter_hf_tensors(model, groups, spec, arch, dtype=dtype, bucket_bytes=bucket_bytes, stats=stats)
        )
    stats.seconds = time.perf_counter() - t0
    return stats
