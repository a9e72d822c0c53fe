"""``megatron-rpp train`` runs the memory plan first: a run that does not fit stops before
anything is built (real CLI, subprocess); ``trainer.skip_memory_check=true`` starts anyway."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
# Llama-3-8B in fp32 on this CPU machine: weights, gradients, Adam, reference and engine are
# ~170 GiB for the host, more than any CI machine has.
TOO_BIG = [f"model.hf_dir={ROOT / 'examples/model_configs/llama3_8b'}", "model.max_prompt_length=64",
           "model.max_response_length=32", "trainer.num_workers=1", "data.num_train_prompts=8"]


def _train(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train", "--config", str(ROOT / "examples/configs/cpu_demo.yaml"),
           *TOO_BIG, f"trainer.output_dir={tmp_path / 'run'}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, time.perf_counter() - t0


def test_a_run_that_does_not_fit_stops_before_anything_is_built(tmp_path):
    proc, seconds = _train(tmp_path)
    print(f"stopped after {seconds:.1f} s")  # ~3-5 s on the 2-core machine, mostly Python imports
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stderr and "[only] pipeline rank 0" in proc.stderr
    assert "trainer.skip_memory_check=true" in proc.stderr
    assert not (tmp_path / "run").exists()  # not even the output directory: nothing was started


def test_skip_memory_check_starts_the_run(tmp_path):
    proc, _ = _train(tmp_path, "trainer.skip_memory_check=true")
    # past the check: the output directory and run.log exist; the run then fails on the missing
    # tokenizer of the config-only folder (which is the point: it did start)
    assert proc.returncode == 1 and "DOES NOT FIT" not in proc.stderr
    assert (tmp_path / "run" / "run.log").is_file()
