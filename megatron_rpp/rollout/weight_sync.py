"""Weight sync: this world's Megatron TP/PP shards -> the local rollout engine, in one of two paths.

Every rank holds (its part of) a colocated engine: one per engine group of
``rollout.tensor_parallel_size`` = k consecutive ranks (``rollout/engine_layout.py``).
With a virtual pipeline a stage owns every PP-th chunk of layers
(``ParamTable.stage(entry, pp, vpp)``), so ownership changes at every chunk boundary and a
bucket never spans two chunks.

**All-gather path** (any layout): every engine rank needs every parameter in full (vLLM's
loaders take the rank's slice), so each parameter travels from the pipeline stage that owns
it to all stages and is reassembled from its TP shards on every rank. Per bucket
(consecutive parameters of one owning stage, at most ``bucket_bytes`` in the engine dtype; a
single larger tensor goes alone):

1. every rank allocates the bucket, [tp, bucket/tp] in the engine dtype; the owning
   stage's ranks cast their shards into their own row;
2. with PP > 1 that row is broadcast over the pipeline group from the owning stage
   (every pipeline group carries its own TP slice, so inter-stage traffic is 1/tp of
   the bucket per link);
3. an in-place all-gather of the rows over the TP group (intra-node link);
4. each parameter is reassembled lazily (``ParamEntry.merge``, incl. the gated
   ``linear_fc1`` layout), converted to the engine's HF model (``engine_layout.to_engine_hf``:
   ``Architecture.to_hf``, the parameter table's names and layouts, e.g. grouped QKV -> q/k/v;
   vocabulary padding dropped; KV-group padding dropped, or kept where the engine runs padded
   heads) and yielded to ``engine.update_weights``.

**Direct-shard path** (engine TP = Megatron TP and the architecture's vLLM layout is
registered, ``rollout/vllm_shards.py``): the engine group is the TP group, so each rank
needs only its own TP rank's shards: steps 1-2 on a [1, bucket/tp] buffer (PP > 1; with
PP = 1 no buffer at all: the live shards are read in place), no step 3, and each shard converted locally to vLLM's per-rank layout (QKV regrouped; vocabulary rows
re-cut after a TP gather of that one tensor where Megatron's and vLLM's vocabulary padding
differ), yielded to ``engine.load_shards``. Per rank it moves 1/tp of the bytes of the
all-gather path.

The whole sync is one generator consumed by one engine call (vLLM buffers a layer until all
its tensors arrived, see ``vllm_engine``), so communication runs lazily as the engine loads.
Peak extra memory: one bucket (shards are packed straight into this rank's row of it, and
the collectives work in place) plus the parameter being converted — never a model copy.
All ranks run the same collectives in the same order (the parameter table's), so the sync
cannot deadlock on ordering.
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
from megatron_rpp.rollout import engine_layout, vllm_shards


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
    role: str = ""
    """The parameter table's role (``qkv``, ``fc1``, ...)."""
    gather: bool = True
    """Reassembled over TP (all-gather path; in the direct path only where vocabulary rows differ)."""

    @property
    def shard_numel(self) -> int:
        n = 1
        for d in self.shard_shape:
            n *= d
        return n

    def full_numel(self, tp: int) -> int:
        return self.shard_numel * (tp if self.tp_sharded else 1)

    def moved_numel(self, tp: int) -> int:
        """Elements this rank holds for the slot in a bucket: all TP rows when gathered, else its own."""
        return self.full_numel(tp) if self.gather else self.shard_numel


@dataclass(frozen=True)
class Bucket:
    """Consecutive parameters owned by one stage, moved with one broadcast (and one all-gather when ``gather``)."""

    stage: int
    slots: tuple[ParamSlot, ...]
    shard_numel: int
    """Elements per TP rank (the packed buffer's length)."""
    nbytes: int
    """Bytes of the bucket on this rank in the engine dtype: all TP rows when gathered, else one."""

    @property
    def gather(self) -> bool:
        return self.slots[0].gather


@dataclass
class SyncStats:
    """What one sync moved and how long it took (this rank's view)."""

    bytes: int = 0
    """Bytes handed to the engine (engine dtype): full HF tensors, or this rank's shards (direct path)."""
    buckets: int = 0
    tensors: int = 0
    """Tensors handed to the engine."""
    max_bucket_bytes: int = 0
    seconds: float = 0.0
    """Wall time of the whole sync (ours + the engine's)."""
    gather_seconds: float = 0.0
    """Time inside our generator: pack, broadcast, all-gather, reassemble, convert."""
    engine_seconds: float = 0.0
    """The engine's own part: ``seconds - gather_seconds`` (vLLM's loaders and post-processing) in the
    all-gather path; vLLM's weight post-processing alone in the direct path (our copies into its
    parameters are ours)."""
    load_seconds: float = 0.0
    """Direct path: copying the shards into the engine's parameters (counted as ours, not the engine's)."""
    path: str = "gather"
    """``gather`` or ``direct``."""


@dataclass(frozen=True)
class SyncPlan:
    """How this world's model reaches its engines: the engine's model and the path (module doc)."""

    engine_tp: int
    engine_spec: ModelSpec
    direct: bool
    reason: str
    """Why the all-gather path is taken ("" for the direct path)."""


def plan_sync(spec: ModelSpec, arch, megatron_tp: int, engine_tp: int, *, direct: bool | None = None) -> SyncPlan:
    """The engine's model for ``spec`` at engine TP ``engine_tp``, and the path the sync takes.

    ``direct``: None = direct whenever the layout allows it; False = always all-gather; True =
    direct or a ``ValueError`` naming why not.
    """
    eng = engine_layout.engine_spec(spec, engine_tp, megatron_tp)
    problem = vllm_shards.direct_shard_problem(arch.name, spec, eng, megatron_tp, engine_tp)
    if direct and problem:
        raise ValueError(f"direct-shard sync not possible: {problem}")
    use = problem is None and direct is not False
    return SyncPlan(engine_tp, eng, use, "" if use else (problem or "all-gather path requested"))


def build_plan(model, groups: ParallelGroups, spec: ModelSpec, arch, *, direct: bool = False) -> list[ParamSlot]:
    """Every parameter of the full model, from the parameter table ``arch.param_table(spec)``.

    Names, owning stages, shard shapes and TP layouts come from the table; each rank checks
    its own stage's parameters against it, and the verdicts are exchanged over the pipeline
    group, so every rank raises (or none does). ``direct``: mark only the slots that must still
    be reassembled over TP (vocabulary rows that differ from vLLM's) as ``gather``.

    Raises:
        WeightSyncError: when this world's parameters and the table differ (a mapping that
            would silently skip or invent a tensor, or a model built from another spec).
    """
    table = arch.param_table(spec)
    tp, pp = groups.tp_size, groups.pp_size
    slots = [
        ParamSlot(e.name, table.stage(e, pp, groups.vpp_size), e.shard_shape(tp), e.partition_dim is not None and tp > 1,
                  -1 if e.partition_dim is None else e.partition_dim, e.gated, e.role,
                  gather=not direct or vllm_shards.shard_kind(e.role, spec, tp) == vllm_shards.VOCAB_GATHER)
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
    local = {name: p for name, p in iter_local_params(model)}
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
    """Group consecutive slots of the same stage (and the same ``gather``) into buckets of at most
    ``bucket_bytes`` on this rank.

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
                    nbytes=sum(s.moved_numel(tp) for s in cur) * element_size,
                )
            )
            cur.clear()

    cur_bytes = 0
    for slot in slots:
        nbytes = slot.moved_numel(tp) * element_size
        if cur and (slot.stage != cur[0].stage or slot.gather != cur[0].gather or cur_bytes + nbytes > bucket_bytes):
            close()
            cur_bytes = 0
        cur.append(slot)
        cur_bytes += nbytes
    close()
    return buckets


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
    """Steps 1-3 of the module doc, in one buffer. Returns the bucket, shape [tp, bucket.shard_numel]
    when gathered, else [1, bucket.shard_numel] (this rank's TP row)."""
    gather = bucket.gather and groups.tp_size > 1
    rows = torch.empty(groups.tp_size if gather else 1, bucket.shard_numel, dtype=dtype, device=device)
    mine = rows[groups.tp_rank if gather else 0]
    if groups.pp_rank == bucket.stage:
        _pack_local(bucket, params, mine)
    if groups.pp_size > 1:
        dist.broadcast(mine, src=groups.pp_ranks[bucket.stage], group=groups.pp_group)
    if gather:
        _all_gather_rows(rows, groups)
    return rows


def _moved_buckets(model, groups: ParallelGroups, slots: list[ParamSlot], *, dtype: torch.dtype,
                   bucket_bytes: int, stats: SyncStats,
                   local_in_place: bool = False) -> Iterator[tuple[Bucket, torch.Tensor | None]]:
    """``(bucket, its rows)`` after steps 1-3, one bucket at a time (collective).

    ``local_in_place``: a bucket that needs no collective (not gathered, PP = 1: the direct
    path's own shards) is not packed; its rows are None and the caller reads the live shards.
    """
    params = dict(iter_local_params(model))
    device = next(iter(params.values())).device
    element_size = torch.empty((), dtype=dtype).element_size()
    for bucket in plan_buckets(slots, tp=groups.tp_size, element_size=element_size, bucket_bytes=bucket_bytes):
        t0 = time.perf_counter()
        stats.buckets += 1
        if local_in_place and groups.pp_size == 1 and not bucket.gather:
            yield bucket, None
            continue
        rows = _move_bucket(bucket, params, groups, dtype, device)
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, bucket.nbytes)
        stats.gather_seconds += time.perf_counter() - t0
        yield bucket, rows
        del rows


def _full_tensor(slot: ParamSlot, rows: torch.Tensor, off: int, single: bool, tp: int) -> torch.Tensor:
    """The full Megatron tensor of ``slot`` from the gathered rows of its bucket (step 4)."""
    n = slot.shard_numel
    if single and slot.tp_sharded and slot.partition_dim == 0 and not slot.gated:
        # The gathered rows already are the full tensor (e.g. the vocab-parallel embedding): no copy.
        return rows.view(slot.shard_shape[0] * tp, *slot.shard_shape[1:])
    used = rows if slot.tp_sharded else rows[:1]
    return merge_tp([r[off:off + n].view(slot.shard_shape) for r in used],
                    slot.partition_dim if slot.tp_sharded else None, slot.gated)


def _count(stats: SyncStats, tensor: torch.Tensor) -> None:
    stats.bytes += tensor.numel() * tensor.element_size()
    stats.tensors += 1


def iter_hf_tensors(
    model,
    groups: ParallelGroups,
    spec: ModelSpec,
    arch,
    *,
    dtype: torch.dtype,
    bucket_bytes: int,
    stats: SyncStats | None = None,
    engine_spec: ModelSpec | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor in dtype)`` of the engine's HF model, on every rank (collective;
    the all-gather path). ``engine_spec``: the engine's model (``engine_layout.engine_spec``;
    default: the HF model itself).

    Every rank must consume the iterator to the end: it runs collectives as it goes.
    """
    stats = stats if stats is not None else SyncStats()
    t0 = time.perf_counter()
    slots = build_plan(model, groups, spec, arch)
    eng = engine_spec or engine_layout.engine_spec(spec, 1, groups.tp_size)
    stats.gather_seconds += time.perf_counter() - t0
    for bucket, rows in _moved_buckets(model, groups, slots, dtype=dtype, bucket_bytes=bucket_bytes, stats=stats):
        off = 0
        for slot in bucket.slots:
            t0 = time.perf_counter()
            full = _full_tensor(slot, rows, off, len(bucket.slots) == 1, groups.tp_size)
            off += slot.shard_numel
            pieces = engine_layout.to_engine_hf(arch, spec, eng, slot.name, slot.role, full)
            del full
            stats.gather_seconds += time.perf_counter() - t0
            for hf_name, tensor in pieces:
                _count(stats, tensor)
                yield hf_name, tensor
            del pieces


def iter_vllm_shards(
    model,
    groups: ParallelGroups,
    spec: ModelSpec,
    arch,
    *,
    dtype: torch.dtype,
    bucket_bytes: int,
    stats: SyncStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(vLLM parameter name, this TP rank's tensor in vLLM's layout)`` for the whole model
    (collective; the direct-shard path, engine TP = Megatron TP).

    Every rank must consume the iterator to the end: it runs collectives as it goes.
    """
    stats = stats if stats is not None else SyncStats()
    t0 = time.perf_counter()
    tp, rank = groups.tp_size, groups.tp_rank
    table = arch.param_table(spec)
    layout = vllm_shards.VLLM_SHARD_LAYOUTS.get(arch.name)
    local = vllm_shards.local_qkv_spec(spec, tp)
    vocab_rows = vllm_shards.vllm_vocab_rows(spec.vocab_size, tp)
    slots = build_plan(model, groups, spec, arch, direct=True)
    params = dict(iter_local_params(model))
    stats.gather_seconds += time.perf_counter() - t0
    for bucket, rows in _moved_buckets(model, groups, slots, dtype=dtype, bucket_bytes=bucket_bytes, stats=stats,
                                       local_in_place=True):
        off = 0
        for slot in bucket.slots:
            t0 = time.perf_counter()
            entry = table[slot.name]
            if slot.gather:  # vocabulary rows that differ from vLLM's: re-cut from the gathered tensor
                full = _full_tensor(slot, rows, off, len(bucket.slots) == 1, tp)
                tensor = vllm_shards.vllm_vocab_shard(full, spec.vocab_size, vocab_rows, rank)
            else:  # PP = 1: the live shard itself (no copy unless cast); else this rank's row of the bucket
                shard = (params[slot.name].detach().to(dtype).reshape(slot.shard_shape) if rows is None
                         else rows[0, off:off + slot.shard_numel].view(slot.shard_shape))
                tensor = vllm_shards.to_vllm_shard(vllm_shards.shard_kind(slot.role, spec, tp), shard, local)
            off += slot.shard_numel
            name = layout.name(slot.role, entry.layer)
            stats.gather_seconds += time.perf_counter() - t0
            _count(stats, tensor)
            yield name, tensor
            del tensor


def sync_weights(
    model,
    groups: ParallelGroups,
    spec: ModelSpec,
    arch,
    engine,
    *,
    bucket_bytes: int = 256 << 20,
    dtype: torch.dtype | None = None,
    direct: bool | None = None,
) -> SyncStats:
    """Push this world's current Megatron weights into ``engine`` (collective over the world).

    Args:
        model: this rank's Megatron model shard, or its virtual-pipeline chunks (DDP/Float16
            wrappers are unwrapped).
        spec, arch: the ``ModelSpec`` the model was built from and its ``Architecture``.
        engine: this rank's :class:`RolloutEngine`; its ``tensor_parallel_size`` (default 1) is the
            engine TP, its ``dtype`` (if any) the target dtype unless ``dtype`` is given. The engine
            must run the model ``engine_layout.engine_spec`` describes (``VllmEngine`` built from
            ``engine_layout.engine_hf_config``).
        bucket_bytes: bound on the bytes held at once per rank (engine dtype).
        direct: the path (:func:`plan_sync`): None = direct-shard where possible.

    Returns:
        :class:`SyncStats` for this rank.
    """
    dtype = dtype or getattr(engine, "dtype", None) or next(iter_local_params(model))[1].dtype
    plan = plan_sync(spec, arch, groups.tp_size, getattr(engine, "tensor_parallel_size", 1), direct=direct)
    stats = SyncStats(path="direct" if plan.direct else "gather")
    t0 = time.perf_counter()
    with torch.no_grad():
        if plan.direct:
            out = engine.load_shards(iter_vllm_shards(model, groups, spec, arch, dtype=dtype,
                                                      bucket_bytes=bucket_bytes, stats=stats))
            stats.engine_seconds = float((out or {}).get("post_process_seconds", 0.0))
            stats.load_seconds = float((out or {}).get("load_seconds", 0.0))
        else:
            engine.update_weights(iter_hf_tensors(model, groups, spec, arch, dtype=dtype, bucket_bytes=bucket_bytes,
                                                  stats=stats, engine_spec=plan.engine_spec))
    stats.seconds = time.perf_counter() - t0
    if not plan.direct:
        stats.engine_seconds = stats.seconds - stats.gather_seconds
    return stats
