"""Every example config goes through the planner and fits the machine it is written for.

A config whose model lives at a ``/path/to/...`` placeholder is planned with the
``config.json`` of the same architecture from examples/model_configs/ (hyperparameters
only); a new example with a placeholder that is not mapped here fails (add its config.json).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rpp.config import load_config
from megatron_rpp.planning import format_plan, plan_for_config
from megatron_rpp.planning.inputs import GiB

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
MODEL_CONFIGS = ROOT / "examples" / "model_configs"
#: placeholder in an example -> the folder of examples/model_configs with its architecture
PLACEHOLDERS = {
    "/path/to/Meta-Llama-3-8B-Instruct": "llama3_8b",
    "/path/to/Llama-3-8B-reward-model": "llama3_8b_rm",
    "/path/to/Qwen2.5-7B-Instruct": "qwen2.5_7b_instruct",
}
#: examples written for this CPU machine: (capacity, the host memory of a 2-core CI runner)
CPU_EXAMPLES = {"cpu_demo.yaml": 16 * GiB}


def _overrides(path: Path) -> list[str]:
    cfg = load_config(path)
    out = []
    for key, value in (("model.hf_dir", cfg.model.hf_dir), ("reward.model_dir", cfg.reward.model_dir)):
        if value.startswith("/path/to/"):
            assert value in PLACEHOLDERS, f"{path.name}: {key}={value}: map it to a folder of {MODEL_CONFIGS}"
            out.append(f"{key}={MODEL_CONFIGS / PLACEHOLDERS[value]}")
    return out


def test_the_examples_are_all_here():
    names = {p.name for p in EXAMPLES}
    assert {"cpu_demo.yaml", "llama3.3_70b_gsm8k.yaml", "qwen2.5_72b_rm.yaml"} <= names and len(names) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_fits_what_it_is_written_for(path):
    cfg = load_config(path, _overrides(path))
    if path.name in CPU_EXAMPLES:
        plan = plan_for_config(cfg, device="cpu", capacity_bytes=CPU_EXAMPLES[path.name])
    else:
        plan = plan_for_config(cfg, device="gpu", capacity_bytes=80 * GiB)
        assert cfg.trainer.num_workers % 8 == 0, "GPU examples fill whole nodes of 8 GPUs"
    assert plan.fits, f"{path.name} does not fit:\n{format_plan(plan)}"
    assert plan.total_params > 0 and 0 < plan.peak_bytes_per_gpu <= plan.capacity_bytes
