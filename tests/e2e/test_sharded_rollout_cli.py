"""End-to-end: the CLI with sharded colocated rollout (engine tensor parallelism), self-check every step.

- SmolLM2-135M-Instruct (the real model), 2 Ray workers, Megatron TP=2, engine TP=2: ONE vLLM
  engine over both ranks (external launcher; it runs Megatron's 4 KV groups, vLLM cannot split
  SmolLM2's 3 over 2 ranks), the direct-shard sync (each rank writes its own shards), the probe
  self-check after every sync at fp32 tolerance 1e-4 (the run stops otherwise).
- 4 Ray workers, Megatron TP=2 x PP=2 on the tiny model: engine TP=2 (two engine groups, one per
  pipeline stage, direct-shard sync across stages) and engine TP=4 (one group over both stages,
  all-gather sync, heads padded for vLLM).

Lean on purpose (2 steps, 2 prompts x 2 samples, <= 16 new tokens): vLLM start-up dominates.
Peak memory per rank with engine TP 1 vs 2 is a benchmark (benchmarks/bench_engine_memory.py),
not a test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]
TOL = 1e-4  # fp32 engine vs fp32 trainer on the probe batch (measured: SmolLM2 <= 4e-5, tiny model <= 5e-6)


def _train(out: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", "model.max_prompt_length=96",
           "model.max_response_length=16", "data.task=basic_arithmetic", "data.num_train_prompts=16",
           "data.num_eval_prompts=2", "reward.function=examples/reward_fns/short_answer.py:response_length",
           "reward.num_workers=0", "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=2",
           "trainer.train_batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-5", "algorithm.kl_coef=0.01",
           "trainer.steps=2", f"trainer.output_dir={out}", "trainer.progress=false", "trainer.export_hf=false",
           "rollout.check_sync_interval=1", f"rollout.check_sync_tolerance={TOL}", "rollout.kv_cache_gib=0.25",
           *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    log = (out / "run.log").read_text()[-6000:] if (out / "run.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\nrun.log:\n" + log
    print(f"{' '.join(overrides)}: {time.monotonic() - t0:.0f} s")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    return rows[1:]


def _check(rows: list[dict], *, direct: bool) -> None:
    for r in rows:
        print(f"step {r['step']}: sync check {r['weight_sync/check_max_abs_diff']:.2e}, rollout gap max "
              f"{r['rollout/logprob_max_abs_diff']:.2e}, direct={r['weight_sync/direct']}, {r['weight_sync/bytes']:.0f} B")
        assert r["weight_sync/check_max_abs_diff"] <= TOL, r
        assert r["weight_sync/direct"] == float(direct), r
        # The engine sampled from the trainer's policy: the rollout log-probs of the sampled tokens agree.
        assert r["rollout/logprob_max_abs_diff"] <= 10 * TOL, r


@pytest.mark.smollm2
def test_smollm2_two_workers_engine_tp2_direct_sync(tmp_path):
    rows = _train(tmp_path / "run", "model.hf_dir=smollm2", "trainer.num_workers=2", "model.tensor_parallel_size=2",
                  "rollout.tensor_parallel_size=2")
    _check(rows, direct=True)
    # Direct path: each rank hands its half (+ the replicated norms): well under the model's 538 MB.
    assert all(r["weight_sync/bytes"] < 0.55 * 538_060_032 for r in rows), rows


@pytest.mark.parametrize("engine_tp,direct", [(2, True), (4, False)],
                         ids=["engine-tp2-two-groups", "engine-tp4-one-group"])
def test_four_workers_tp2_pp2(tmp_path, engine_tp, direct):
    hf = make_tiny_hf_dir(tmp_path.parent / "tiny_llama_hf")
    rows = _train(tmp_path / "run", f"model.hf_dir={hf}", "trainer.num_workers=4", "model.tensor_parallel_size=2",
                  "model.pipeline_parallel_size=2", f"rollout.tensor_parallel_size={engine_tp}")
    _check(rows, direct=direct)
