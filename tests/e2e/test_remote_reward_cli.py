"""End-to-end: the real CLI scoring with ``reward.remote_url`` served by a real local HTTP server."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from testlib.reward_server import RewardServer, fail
from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).parents[2]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    stderr_times: list[tuple[float, str]]  # (seconds since start, line) as each stderr line arrived

    def seconds_after(self, text: str) -> float:
        """Seconds from the first stderr line containing ``text`` to the process's exit."""
        return self.wall_s - next(t for t, line in self.stderr_times if text in line)


def _train(tmp_path: Path, url: str, *overrides: str) -> Run:
    """One CLI run on the tiny model with one in-process worker; stderr lines are timestamped as they arrive."""
    hf = make_tiny_hf_dir(tmp_path.parent / "tiny_llama_hf")
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train",
           f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=16",
           "data.task=basic_arithmetic", "data.num_train_prompts=64", "data.num_eval_prompts=4",
           f"reward.remote_url={url}", "reward.remote_timeout_s=10",
           "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=2", "trainer.train_batch_size=4",
           "trainer.micro_batch_size=2", "trainer.lr=1e-4", "algorithm.kl_coef=0", "trainer.num_workers=1",
           "trainer.export_hf=false", f"trainer.output_dir={tmp_path / 'run'}", "trainer.progress=false", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out: list[str] = []
    err: list[tuple[float, str]] = []
    pumps = [threading.Thread(target=lambda: out.extend(proc.stdout)),
             threading.Thread(target=lambda: err.extend((time.perf_counter() - t0, line) for line in proc.stderr))]
    for p in pumps:
        p.start()
    returncode = proc.wait(timeout=600)
    wall_s = time.perf_counter() - t0
    for p in pumps:
        p.join()
    return Run(returncode, "".join(out), "".join(line for _, line in err), wall_s, err)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_remote_reward_survives_a_failing_request_and_stops_when_the_server_is_gone(tmp_path):
    with RewardServer() as server:
        server.script = [fail(500)]  # the run's first request (step-0 evaluation) fails once
        run = _train(tmp_path / "up", server.url, "trainer.steps=2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert f"remote reward {server.url}: attempt 1/4" in run.stderr and "HTTP 500" in run.stderr
    # Requests in order: 500, then scored: eval (step 0), train step 1, train step 2, eval (step 2).
    assert len(server.requests) == 5 and [len(r) for r in server.replies] == [4, 4, 4, 4]
    assert server.requests[0] == server.requests[1]  # the retry resends the same batch
    assert all(s["answer"] for s in server.requests[2]["samples"])  # data rows travel as samples
    rows = [json.loads(line) for line in (tmp_path / "up" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    eval0, train1, train2, eval2 = map(_mean, server.replies)
    # The logged rewards are the server's: eval means in fp64, train means in fp32 (torch.tensor(raw).mean()).
    assert rows[0]["eval/reward_mean"] == pytest.approx(eval0, rel=1e-12)
    assert rows[2]["eval/reward_mean"] == pytest.approx(eval2, rel=1e-12)
    assert [rows[1]["reward/mean"], rows[2]["reward/mean"]] == pytest.approx([train1, train2], rel=1e-6)
    assert all(math.isfinite(r["reward/mean"]) for r in rows[1:])

    # The server is gone: the start-up check stops the run before any model or engine is built.
    run = _train(tmp_path / "down", server.url, "trainer.steps=1", "reward.remote_max_retries=1",
                 "reward.remote_timeout_s=60")
    assert run.returncode != 0
    assert (f"RewardError: remote reward {server.url}: cannot connect to 127.0.0.1:{urlsplit(server.url).port} after 2 attempts"
            in run.stderr)
    assert "Connection refused" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "down" / "run" / "metrics.jsonl").exists()
    # No model or engine was built: nothing of vLLM's or Megatron's reached the run's log.
    log = (tmp_path / "down" / "run" / "run.log").read_text()
    assert "RewardError" in log and "vllm" not in log and "megatron.core" not in log, log[-3000:]
    stop_s = run.seconds_after(f"remote reward {server.url}: attempt 1/2 for the start-up check")
    print(f"\ndead endpoint: the run exited {stop_s:.1f} s after the first failed attempt ({run.wall_s:.1f} s in all)")
    # 1 s backoff, a refused retry, exit (~1.5 s): far below one 60 s request timeout, and 20x
    # margin for a loaded machine.
    assert stop_s < 30
