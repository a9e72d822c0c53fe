"""Kill a run with SIGKILL after its step-2 checkpoint, resume it, and get the uninterrupted run's metrics.

Two runs: REINFORCE++ (policy + optimizer) and PPO (``algorithm.estimator=gae``: the critic and its
optimizer are checkpointed and restored too; one warm-up step where only the critic trains).

Deterministic CPU mode: the rollouts of a step depend only on (seed, step, rank) and the
weights (the engine's RNG is reseeded per step), and the checkpoint restores weights,
optimizer state, data position and reward-normalisation state bitwise. The resumed
steps 3..5 must therefore equal the uninterrupted run's: measured bitwise equal; the test
allows 1e-9 relative. (Sensitivity: zeroing the restored Adam moments already moves the
step-3 entropy by 2e-6 relative at lr 1e-4; this test trains at lr 1e-3.)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]
NOT_COMPARED = ("timing/", "throughput/")


#: estimator -> its extra overrides.
RUNS = {"reinforce_pp": [], "gae": ["algorithm.estimator=gae", "critic.lr=1e-3", "critic.warmup_steps=1"]}


def _cmd(hf: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_rpp.cli", "train",
            f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=16",
            "data.task=basic_arithmetic", "data.num_train_prompts=64", "data.num_eval_prompts=4",
            "reward.function=examples/reward_fns/short_answer.py:response_length", "reward.num_workers=0",
            "reward.normalize=true", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2",
            "trainer.train_batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-3",
            "algorithm.kl_coef=0.01", "trainer.steps=5", "trainer.save_interval=2", "trainer.keep_checkpoints=2",
            "trainer.export_hf=false", f"trainer.output_dir={out}", "trainer.progress=false", *extra]


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _same(a: dict, b: dict, step: int) -> float:
    """Assert equal metrics (all but timings); returns the largest relative difference."""
    keys = {k for k in a if not k.startswith(NOT_COMPARED)}
    assert keys == {k for k in b if not k.startswith(NOT_COMPARED)}, step
    worst = 0.0
    for k in sorted(keys):
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), (step, k)
            continue
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (step, k, x, y)
        worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return worst


# The REINFORCE++ run is extended: the default tier resumes a REINFORCE++ run after a SIGKILL in
# tests/cluster/test_slurm_train.py (a DP=2 job whose node is killed, same tolerance) and the PPO run here.
@pytest.mark.parametrize("estimator", [pytest.param("reinforce_pp", marks=pytest.mark.extended), "gae"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, estimator):
    hf = make_tiny_hf_dir(tmp_path / "tiny_llama_hf")
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = RUNS[estimator]

    t0 = time.monotonic()
    proc = subprocess.run(_cmd(hf, full, *extra), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"uninterrupted run: {time.monotonic() - t0:.0f} s")
    ckpts = full / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert (ckpts / "step_00000004" / "critic_optim").is_dir() == (estimator == "gae")

    # The same run, killed with SIGKILL as soon as its step-2 checkpoint is complete.
    log = tmp_path / "killed.log"  # a file, not a pipe nobody reads (a full pipe would block the run)
    t0 = time.monotonic()
    with open(log, "w") as sink:
        victim = subprocess.Popen(_cmd(hf, killed, *extra), stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                                  start_new_session=True)
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 600
    while not (latest.is_file() and latest.read_text().strip() == "step_00000002"):
        assert victim.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, "no step-2 checkpoint within 600 s:\n" + log.read_text()[-6000:]
        time.sleep(0.05)
    print(f"killed run up to its step-2 checkpoint: {time.monotonic() - t0:.0f} s")
    os.killpg(victim.pid, signal.SIGKILL)  # the whole session: controller and its engine/scorer children
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert max(_rows(killed)) < 5

    # A newer checkpoint truncated mid-write must be ignored by resume=auto.
    bogus = killed / "checkpoints" / "step_00000004"
    shutil.copytree(killed / "checkpoints" / "step_00000002", bogus)
    biggest = max((p for p in bogus.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)

    t0 = time.monotonic()
    proc = subprocess.run(_cmd(hf, killed, *extra, "trainer.resume=auto"), capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    print(f"resumed run: {time.monotonic() - t0:.0f} s")
    assert "ignoring incomplete checkpoint" in proc.stderr and "step_00000004" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000002" in proc.stdout

    a, b = _rows(full), _rows(killed)
    assert sorted(b) == sorted(a) == [0, 1, 2, 3, 4, 5]
    worst = max(_same(a[step], b[step], step) for step in range(6))  # rows 3..5 recomputed after the resume
    print(f"largest relative metric difference, resumed vs uninterrupted: {worst:.3g}")
    assert a[5]["reward/mean"] != a[3]["reward/mean"] or a[5]["policy/loss"] != a[3]["policy/loss"]
    if estimator == "gae":  # the critic trained through the resume: its values moved and are compared above
        assert math.isnan(a[1]["policy/loss"]) and not math.isnan(a[2]["policy/loss"])  # warm-up: critic only
        assert len({a[s]["critic/values_mean"] for s in (1, 3, 4, 5)}) == 4 and a[1]["critic/values_mean"] == 0.0
