"""Bucket planning of the weight sync (pure: no process group, no engine)."""
from __future__ import annotations

import pytest

from megatron_rpp.rollout.weight_sync import ParamSlot, plan_buckets


def slot(name: str, stage: int, shape: tuple[int, ...], sharded: bool = True) -> ParamSlot:
    return ParamSlot(name=name, stage=stage, shard_shape=shape, tp_sharded=sharded, partition_dim=0)


def test_buckets_respect_bound_stage_and_order():
    # tp = 2, fp32: full bytes = 2 * shard elements * 4 (norms are not sharded: 1 * elements * 4).
    slots = [
        slot("emb", 0, (8, 4)),            # 256 B
        slot("l0.norm", 0, (4,), False),   # 16 B
        slot("l0.qkv", 0, (12, 4)),        # 384 B
        slot("l1.norm", 1, (4,), False),   # 16 B  (stage 1: a new bucket)
        slot("l1.qkv", 1, (12, 4)),        # 384 B
        slot("out", 1, (64, 4)),           # 2048 B > bound: alone
        slot("final", 1, (4,), False),     # 16 B
    ]
    buckets = plan_buckets(slots, tp=2, element_size=4, bucket_bytes=600)
    assert [[s.name for s in b.slots] for b in buckets] == [
        ["emb", "l0.norm"],          # 272; + qkv (384) would exceed 600
        ["l0.qkv"],
        ["l1.norm", "l1.qkv"],       # 400
        ["out"],                     # one tensor above the bound travels alone
        ["final"],
    ]
    assert [b.stage for b in buckets] == [0, 0, 1, 1, 1]
    assert [b.nbytes for b in buckets] == [272, 384, 400, 2048, 16]
    # Packed length per TP rank: shard elements (the norm is replicated, its full size once).
    assert buckets[0].shard_numel == 8 * 4 + 4
    # Every parameter exactly once, in order.
    assert [s.name for b in buckets for s in b.slots] == [s.name for s in slots]


def test_one_big_bucket_per_stage():
    slots = [slot(f"p{i}", i // 3, (2, 2)) for i in range(6)]
    buckets = plan_buckets(slots, tp=1, element_size=2, bucket_bytes=1 << 30)
    assert [len(b.slots) for b in buckets] == [3, 3]
    assert [b.nbytes for b in buckets] == [24, 24]


def test_bucket_bytes_must_be_positive():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], tp=1, element_size=4, bucket_bytes=0)
