"""Engine groups, the engine's (padded) model and the direct-shard layout: pure, no engine.

The references are independent of the code under test: vLLM's own per-rank slicing written
out by hand (``parameter.py``: q rows of rank r, k/v rows of rank r; vocabulary rows of the
64-padded vocabulary), and transformers' own Llama in float64 for "zero KV groups change nothing".
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_rpp.models.architectures import architecture_for_config
from megatron_rpp.models.architectures.conversions import fuse_qkv
from megatron_rpp.parallel.gather import tp_shard
from megatron_rpp.rollout import vllm_shards
from megatron_rpp.rollout.engine_layout import (
    EngineGroups,
    engine_hf_config,
    engine_query_groups,
    engine_spec,
    engine_tp_problem,
    repad_query_groups,
    to_engine_hf,
)
from megatron_rpp.rollout.weight_sync import ParamSlot, plan_buckets, plan_sync
from testlib.tiny_models import tiny_config


def test_engine_groups_are_consecutive_ranks():
    g = EngineGroups(world_size=8, tensor_parallel_size=4)
    assert g.num_groups == 2
    assert [g.group_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [g.leader_of(e) for e in range(2)] == [0, 4]
    assert [r for r in range(8) if g.is_leader(r)] == [0, 4]
    assert [g.rank_in_group(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size \(3\) must divide trainer.num_workers \(8\)"):
        EngineGroups(8, 3)


@pytest.mark.parametrize("world,k,tp,ok", [(4, 2, 2, True), (4, 4, 2, True), (4, 1, 2, True), (8, 8, 4, True),
                                           (4, 3, 1, False), (6, 3, 2, False), (8, 2, 8, True), (8, 4, 8, True)])
def test_engine_tp_problem_names_both_fields(world, k, tp, ok):
    problem = engine_tp_problem(world, k, tp)
    assert (problem is None) == ok, problem
    if not ok:
        assert problem.startswith(f"rollout.tensor_parallel_size ({k})")
        assert "trainer.num_workers" in problem or "model.tensor_parallel_size" in problem


@pytest.mark.parametrize("heads,groups,k,tp,expected", [
    (9, 3, 2, 2, 4),   # SmolLM2 at engine TP = Megatron TP = 2: Megatron's padding (12 heads, 4 groups)
    (9, 3, 1, 2, 3),   # one engine per rank: the real heads
    (9, 3, 4, 2, 4),   # 9 heads do not split over 4 ranks: padded to a multiple of 4
    (4, 2, 4, 2, 2),   # vLLM replicates 2 KV heads over 4 ranks (k % g == 0, n % k == 0): real heads
    (6, 3, 4, 2, 4),
    (64, 8, 8, 8, 8),  # Llama-3-70B at TP 8
    (64, 8, 8, 4, 8),
    (2, 1, 2, 2, 2),   # the tiny e2e model (1 KV head) at TP 2: Megatron pads it to 2
])
def test_engine_query_groups(heads, groups, k, tp, expected):
    assert engine_query_groups(heads, groups, k, tp) == expected


def test_qwen2_engines_run_their_real_heads():
    """vLLM's Qwen2 derives head_dim from hidden / heads: no padded heads, real ones must split."""
    cfg = tiny_config("qwen2")
    cfg.update(num_attention_heads=6, num_key_value_heads=3, hidden_size=384)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(2)
    assert engine_spec(spec, 1, 2).num_query_groups == 3
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size \(2\) must divide num_attention_heads \(6\)"):
        engine_spec(spec, 2, 2)
    llama = dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama")
    assert engine_spec(architecture_for_config(llama).model_spec(llama).for_tp(2), 2, 2).num_query_groups == 4
    # Real heads that split (2 KV heads replicated over 4 ranks): the engine keeps them, so the sync gathers.
    small = tiny_config("qwen2")
    arch = architecture_for_config(small)
    spec4 = arch.model_spec(small).for_tp(4)  # Megatron pads 2 KV groups to 4
    assert engine_spec(spec4, 4, 4).num_query_groups == 2 and not plan_sync(spec4, arch, 4, 4).direct


def test_repad_query_groups_by_hand():
    # 2 groups of 3 rows each (qkv, dim 0): rows g0 = [0, 1, 2], g1 = [3, 4, 5] (g1 is padding: zero).
    qkv = torch.tensor([[1.0], [2.0], [3.0], [0.0], [0.0], [0.0]])
    assert repad_query_groups("qkv", qkv, 2, 1).tolist() == [[1.0], [2.0], [3.0]]           # padding dropped
    assert repad_query_groups("qkv", qkv, 2, 3).tolist() == [[1.0], [2.0], [3.0]] + [[0.0]] * 6  # one zero group more
    proj = torch.tensor([[1.0, 2.0, 0.0, 0.0]])  # 2 groups of 2 columns (dim 1)
    assert repad_query_groups("proj", proj, 2, 4).tolist() == [[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert repad_query_groups("fc1", qkv, 2, 4) is qkv  # no KV groups in other roles


def test_padded_engine_model_computes_the_hf_function():
    """transformers' Llama in float64: the engine's model (6 heads / 3 KV groups padded to 8 / 4,
    the HF tensors from ``to_engine_hf``) gives the real model's logits."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config("llama", tied=False)
    cfg.update(num_attention_heads=6, num_key_value_heads=3, hidden_size=384, num_hidden_layers=2)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(2)   # Megatron: 4 KV groups
    eng = engine_spec(spec, 4, 2)           # the engine at TP 4: 4 KV groups, 8 heads
    assert (eng.num_attention_heads, eng.num_query_groups) == (8, 4)

    def hf_model(c):
        c = dict(c)
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(c.pop("model_type"), **c),
                                                             dtype=torch.float64)

    torch.manual_seed(0)
    real = hf_model(cfg)
    state = real.state_dict()
    padded_cfg = engine_hf_config(cfg, spec, eng)
    assert (padded_cfg["num_attention_heads"], padded_cfg["num_key_value_heads"], padded_cfg["head_dim"]) == (8, 4, 64)
    padded = {}
    for e in arch.param_table(spec):
        full = arch.to_megatron(spec, e.name, [state[n] for n in e.hf_names])  # what Megatron holds (padded)
        padded.update(to_engine_hf(arch, spec, eng, e.name, e.role, full))
    engine_model = hf_model(padded_cfg)
    engine_model.load_state_dict(padded, strict=True)  # every tensor of the padded model, nothing else
    tokens = torch.randint(0, cfg["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.allclose(engine_model(tokens).logits, real(tokens).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 1])
def test_direct_qkv_shard_is_vllms_per_rank_slice(rank):
    """Megatron's grouped QKV shard of rank r, regrouped, = [q_r; k_r; v_r] as vLLM's loader slices it."""
    cfg = tiny_config("qwen2")
    cfg.update(num_attention_heads=6, num_key_value_heads=3, hidden_size=384)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(2)  # 4 groups (one zero), 8 heads
    n, g, d, h = spec.megatron_attention_heads, spec.megatron_query_groups, spec.kv_channels, spec.hidden_size
    q = torch.randn(spec.num_attention_heads * d, h)
    k = torch.randn(spec.num_query_groups * d, h)
    v = torch.randn(spec.num_query_groups * d, h)
    # The engine's HF tensors (zero heads appended), sliced as vLLM's QKV loader does at TP 2.
    qp = torch.cat([q, q.new_zeros((n - spec.num_attention_heads) * d, h)])
    kp, vp = (torch.cat([t, t.new_zeros((g - spec.num_query_groups) * d, h)]) for t in (k, v))
    nq, nk = n // 2 * d, g // 2 * d
    expected = torch.cat([qp[rank * nq:(rank + 1) * nq], kp[rank * nk:(rank + 1) * nk], vp[rank * nk:(rank + 1) * nk]])
    shard = tp_shard(fuse_qkv(spec, q, k, v), 2, rank, 0, False)
    ours = vllm_shards.to_vllm_shard(vllm_shards.QKV, shard, vllm_shards.local_qkv_spec(spec, 2))
    assert torch.equal(ours, expected)


def test_vocabulary_rows_aligned_or_recut():
    cfg = tiny_config("llama", vocab_size=320)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(2)  # Megatron 512 rows (multiple of 256)
    assert spec.megatron_vocab_size == 512 and vllm_shards.vllm_vocab_rows(320, 2) == 160
    assert vllm_shards.shard_kind("embedding", spec, 2) == vllm_shards.VOCAB_GATHER
    aligned = architecture_for_config(tiny_config("llama")).model_spec(tiny_config("llama")).for_tp(2)
    assert vllm_shards.shard_kind("embedding", aligned, 2) == vllm_shards.LOCAL
    assert vllm_shards.shard_kind("fc1", spec, 2) == vllm_shards.LOCAL
    full = torch.arange(512.0)[:, None].expand(512, 3).clone()
    full[320:] = 0
    assert torch.equal(vllm_shards.vllm_vocab_shard(full, 320, 160, 1)[:, 0], torch.arange(160.0, 320.0))
    # 300 real rows -> vLLM pads to 320: rank 1 holds rows 160..299 and 20 zero rows.
    tail = vllm_shards.vllm_vocab_shard(full, 300, 160, 1)[:, 0]
    assert torch.equal(tail[:140], torch.arange(160.0, 300.0)) and not tail[140:].any()


def test_plan_sync_paths():
    for name in ("llama", "qwen2", "qwen3", "phi3"):
        cfg = tiny_config(name)
        arch = architecture_for_config(cfg)
        spec = arch.model_spec(cfg).for_tp(2)
        assert plan_sync(spec, arch, 2, 2).direct, name
        assert not plan_sync(spec, arch, 2, 4).direct and "engine TP 4 != Megatron TP 2" in plan_sync(spec, arch, 2, 4).reason
        assert not plan_sync(spec, arch, 2, 2, direct=False).direct
    spec1 = arch.model_spec(cfg).for_tp(1)
    assert not plan_sync(spec1, arch, 1, 1).direct
    with pytest.raises(ValueError, match="direct-shard sync not possible"):
        plan_sync(spec1, arch, 1, 1, direct=True)
    # Megatron's and the engine's KV groups differ only through a bug: refused, not silently mis-sharded.
    assert "KV groups" in vllm_shards.direct_shard_problem(arch.name, spec, replace(spec, num_query_groups=1), 2, 2)


def test_direct_buckets_hold_one_row_and_never_mix_with_gathered_slots():
    slots = [ParamSlot("emb", 0, (8, 4), True, 0, gather=True), ParamSlot("norm", 0, (4,), False, -1, gather=False),
             ParamSlot("qkv", 0, (12, 4), True, 0, gather=False), ParamSlot("out", 0, (8, 4), True, 0, gather=True)]
    buckets = plan_buckets(slots, tp=2, element_size=4, bucket_bytes=1 << 20)
    assert [[s.name for s in b.slots] for b in buckets] == [["emb"], ["norm", "qkv"], ["out"]]
    assert [b.gather for b in buckets] == [True, False, True]
    assert [b.nbytes for b in buckets] == [2 * 32 * 4, (4 + 48) * 4, 2 * 32 * 4]  # direct: this rank's row only
