"""Acceptance: ``megatron-rpp train`` at TP=2 x PP=2 and at PP=2 x VPP=2 (4 gloo ranks under Ray) takes
the same first step as TP=1/PP=1.

One step of a tiny 4-layer Llama (SmolLM2's tokenizer, fp32, dropout 0): 4 prompts x 2 samples,
``trainer.micro_batch_size=1``, so every rank's pipeline schedule runs >= 4 micro-batches (8 at
TP2 x PP2 = DP1, 4 at PP2 x VPP2 = DP2: interleaved 1F1B). The KL term is on, so the policy and
reference models also score through the same schedules; the weight sync and its self-check run
with the interleaved layer ownership; the final export (Megatron checkpoint -> HF folder) too.

Identical rollouts whatever the layout: prompts are split across ranks and each rank's sampler
is seeded per rank, so ``rollout.top_k=1`` makes sampling deterministic (the argmax token, for any
RNG state) while the trainer still scores log-probs at the rollout temperature (1.0) over the full
vocabulary. Validation allows it (top_k is -1 or >= 1).

Tolerances: ``policy/loss`` and ``grad_norm`` to 1e-5 (fp32 sums reassociated over TP ranks, stages
and micro-batches differ by ~1e-7). Weights after the step to 1e-5 (the issue's bound) with
``trainer.lr=1e-4``: Adam's first update is lr·g/(|g| + eps) ~ lr·sign(g) = 1e-4 per element (10x
the tolerance, so a layout that trained a wrong gradient, or no gradient, fails), and for elements
whose |g| is near Adam's eps (1e-8) a reassociated gradient moves the update by up to lr·δ/eps,
which scales with lr: at lr 1e-3 it measured 2.05e-5 at TP2 x PP2 (one element of
layers.3.mlp.gate_proj; grad_norm equal to 5e-7 relative), so ~2e-6 at 1e-4 (test_train_state's
resume at another layout keeps lr 1e-3 and the 5e-5 bound for the same reason).
The reward is the prompt's length (tests/e2e/prompt_reward.py): greedy answers of a tiny random
model can all be the same text, and a constant reward gives zero advantages and no gradient.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]
LAYOUTS = {
    "tp1pp1": ["trainer.num_workers=1"],
    "tp2pp2": ["trainer.num_workers=4", "model.tensor_parallel_size=2", "model.pipeline_parallel_size=2"],
    "pp2vpp2": ["trainer.num_workers=4", "model.pipeline_parallel_size=2", "model.virtual_pipeline_size=2"],
}


def _train(tmp: Path, hf: Path, name: str) -> tuple[dict, dict[str, torch.Tensor], float]:
    from safetensors.torch import load_file

    out = tmp / name
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", f"model.hf_dir={hf}", "model.max_prompt_length=96",
           "model.max_response_length=8", "data.task=basic_arithmetic", "data.num_train_prompts=16",
           "data.num_eval_prompts=0", f"reward.function={Path(__file__).with_name('prompt_reward.py')}:prompt_length",
           "reward.num_workers=0", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2",
           "rollout.top_k=1", "rollout.kv_cache_gib=0.25", "rollout.check_sync_interval=1",
           "trainer.train_batch_size=8", "trainer.micro_batch_size=1", "trainer.lr=1e-4", "algorithm.kl_coef=0.01",
           "trainer.steps=1", f"trainer.output_dir={out}", "trainer.progress=false", *LAYOUTS[name]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    seconds = time.perf_counter() - t0
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\nrun.log:\n" + log[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in rows if r["step"] == 1]
    return step, load_file(out / "hf" / "model.safetensors"), seconds


def test_tp2pp2_and_pp2vpp2_first_step_equals_tp1pp1(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "tiny_llama_4l", num_layers=4)
    from safetensors.torch import load_file

    start = load_file(hf / "model.safetensors")
    runs = {name: _train(tmp_path, hf, name) for name in LAYOUTS}
    ref, ref_weights, _ = runs["tp1pp1"]
    for name, (row, weights, seconds) in runs.items():
        moved = min(float((weights[k] - start[k]).abs().max()) for k in start)
        diffs = {k: float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights}
        print(f"{name}: {seconds:.0f} s; policy/loss {row['policy/loss']:.8f} (ref {ref['policy/loss']:.8f}), "
              f"grad_norm {row['grad_norm']:.8f} (ref {ref['grad_norm']:.8f}), reward {row['reward/mean']}, "
              f"max |w - w_ref| {max(diffs.values()):.2e}, min over tensors of max |w - w_start| {moved:.2e}, "
              f"sync check {row['weight_sync/check_max_abs_diff']:.2e}")
        assert ref["grad_norm"] > 1e-3, ref  # a real gradient (the prompt-length reward varies: advantages != 0)
        assert row["reward/mean"] == ref["reward/mean"] and row["response_length/mean"] == ref["response_length/mean"]
        assert abs(row["policy/loss"] - ref["policy/loss"]) <= 1e-5, (name, row["policy/loss"], ref["policy/loss"])
        assert abs(row["grad_norm"] - ref["grad_norm"]) <= 1e-5, (name, row["grad_norm"], ref["grad_norm"])
        assert abs(row["kl/mean"] - ref["kl/mean"]) <= 1e-6, name
        assert weights.keys() == ref_weights.keys() == start.keys()
        assert max(diffs.values()) <= 1e-5, (name, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
        assert moved > 5e-5, (name, moved)  # every tensor took a real step (Adam: ~lr = 1e-4)
        assert row["weight_sync/check_max_abs_diff"] < 2e-5  # the engines got the trained weights
