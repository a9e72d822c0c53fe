"""``megatron-rpp plan``: table, JSON, exit codes (in-process; only config.json files are read)."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_rpp.cli import main

ROOT = Path(__file__).resolve().parents[3]
LLAMA = str(ROOT / "examples/configs/llama3.3_70b_gsm8k.yaml")


def test_plan_table_and_exit_code_0_when_it_fits(capsys):
    assert main(["plan", "--config", LLAMA, "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "70.55 B parameters" in out and "verdict: FITS" in out
    for kind in ("[first]", "[middle]", "[last]"):
        assert kind in out


def test_plan_json_and_exit_code_1_when_it_does_not_fit(capsys):
    # the same run on 40 GiB GPUs does not fit
    assert main(["plan", "--config", LLAMA, "--gpu-memory-gib", "40", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is False and doc["gpu_memory_bytes"] == 40 << 30
    assert doc["peak_bytes_per_gpu"] > 40 << 30 and doc["total_params"] == 70_553_706_496


def test_plan_overrides_and_bad_config(capsys):
    assert main(["plan", "--config", LLAMA, "model.tensor_parallel_size=1", "model.pipeline_parallel_size=1"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "dominant term policy_grads" in out and "suggestion: " in out
    assert main(["plan", "--config", LLAMA, "model.pipeline_parallel_size=3"]) == 2  # 80 layers do not split in 3
    assert "model.pipeline_parallel_size" in capsys.readouterr().err
    assert main(["plan", "--config", LLAMA, "model.hf_dir=/nonexistent"]) == 2
    assert "no config.json" in capsys.readouterr().err
