"""benchmarks/compare_estimators.py: its summary arithmetic, and seeds that reproduce a curve.

1. ``summarize_run`` + ``aggregate`` on hand-made metrics rows: the table's columns (final/best
   eval reward mean ± sample std over seeds, Δ eval reward / final KL, lengths, per-phase step
   time without evaluation) against values worked out by hand.
2. The study's own ``run_one`` (a ``megatron-rpp train`` subprocess) on a tiny model, PPO (the
   estimator with the most state: policy, reference and critic): the same (estimator, seed)
   twice gives the same curves — every eval and train point, bitwise — and another seed gives
   other curves (so the comparison can fail). A finished run is reused, not trained again, from its
   summary.json or — the work dir gone — from its record in the study's JSON, only when the
   command is the same.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from testlib.tiny_hf import make_tiny_hf_dir

ROOT = Path(__file__).parents[2]


def _study():
    spec = importlib.util.spec_from_file_location("compare_estimators", ROOT / "benchmarks" / "compare_estimators.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rows(eval_rewards: list[float], kl_end: float) -> list[dict]:
    """A 2-step run, evaluated at steps 0 and 2."""
    t = {"timing/generate": 2.0, "timing/reward": 0.5, "timing/old_log_probs": 1.0, "timing/ref_log_probs": 1.0,
         "timing/train": 4.0}
    return [
        {"step": 0, "eval/reward_mean": eval_rewards[0], "eval/response_length_mean": 10.0},
        {"step": 1, "reward/mean": 0.2, "kl/policy_ref_k3": 0.01, "response_length/mean": 20.0, **t,
         "timing/step": 9.0, "tokens/train_real": 100.0},
        {"step": 2, "reward/mean": 0.4, "kl/policy_ref_k3": kl_end, "response_length/mean": 16.0, **t,
         "timing/eval": 3.0, "timing/step": 12.0, "eval/reward_mean": eval_rewards[1],
         "eval/response_length_mean": 8.0, "tokens/train_real": 120.0},
    ]


def test_summary_columns_hand_worked():
    ce = _study()
    runs = [ce.summarize_run("rule", "RLOO", 1, _rows([0.25, 0.50], 0.05), wall=60.0, peak_rss_mib=1024.0),
            ce.summarize_run("rule", "RLOO", 2, _rows([0.25, 0.75], 0.10), wall=62.0, peak_rss_mib=2048.0)]
    assert runs[0]["eval"] == [{"step": 0, "reward": 0.25, "response_length": 10.0, "kl": 0.0},
                               {"step": 2, "reward": 0.50, "response_length": 8.0, "kl": 0.05}]
    # step time without evaluation: (9 + 12 - 3) / 2 = 9; score = reward + old + ref = 2.5; other = 9 - 2 - 2.5 - 4
    assert runs[0]["seconds_per_step"] == {"generate": 2.0, "score": 2.5, "train": 4.0, "step": 9.0, "other": 0.5}
    a = ce.aggregate(runs)["RLOO"]
    assert a["eval_reward_final"] == {"mean": 0.625, "std": pytest.approx(0.125 * math.sqrt(2)), "n": 2}
    assert a["eval_reward_best"]["mean"] == 0.625
    # Δ eval reward / final KL per seed: 0.25 / 0.05 = 5 and 0.5 / 0.1 = 5
    assert a["reward_gain_per_kl"]["mean"] == pytest.approx(5.0) and a["reward_gain_per_kl"]["std"] == pytest.approx(0)
    assert a["response_length_start"]["mean"] == 20.0 and a["response_length_end"]["mean"] == 16.0
    assert a["peak_rss_mib"]["mean"] == 1536.0
    assert "| RLOO | 0.625 ± 0.177 |" in ce.table("rule", {"RLOO": a})


@pytest.mark.e2e
@pytest.mark.vllm
def test_same_seed_same_curve(tmp_path):
    ce = _study()
    hf = make_tiny_hf_dir(tmp_path / "tiny_llama_hf")
    overrides = [f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=16",
                 "reward.function=examples/reward_fns/short_answer.py:response_length", "data.num_eval_prompts=4",
                 "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2", "trainer.train_batch_size=4",
                 "trainer.micro_batch_size=4", "trainer.lr=1e-4", "algorithm.kl_coef=0.01", "critic.lr=1e-3",
                 "trainer.steps=2", "trainer.eval_interval=1"]
    a, b = (ce.run_one("rule", "PPO", 1, overrides, tmp_path / f"run_{i}") for i in range(2))
    assert len(a["eval"]) == 3 and len(a["train"]) == 2 and "explained_variance" in a["train"][-1]
    assert [e["step"] for e in a["eval"]] == ce.eval_steps(2, 1)  # the duration estimate counts what the trainer does
    assert (a["eval"], a["train"]) == (b["eval"], b["train"])  # the same (estimator, seed): every point equal

    # resuming: the summary.json in the run's directory, else the study JSON's record of the same command
    assert ce.run_one("rule", "PPO", 1, overrides, tmp_path / "run_0")["reused"]
    (tmp_path / "run_0" / "summary.json").unlink()
    recorded = {json.dumps(a["command"]): a}
    again = ce.run_one("rule", "PPO", 1, overrides, tmp_path / "run_0", recorded=recorded)
    assert again["reused"] and (again["eval"], again["train"]) == (a["eval"], a["train"])
    assert not (tmp_path / "run_0" / "summary.json").exists()  # nothing trained
    other = ce.run_one("rule", "PPO", 2, overrides, tmp_path / "run_0", recorded=recorded)  # another command: trains
    assert "reused" not in other and (other["eval"], other["train"]) != (a["eval"], a["train"])  # other rollouts


def test_eval_steps_hand_worked():
    ce = _study()
    assert ce.eval_steps(4, 2) == [0, 2, 4]  # the rule scenario
    assert ce.eval_steps(3, 2) == [0, 2, 3]  # bt: the last step is evaluated too
    assert ce.eval_steps(6, 4) == [0, 4, 6]
    assert ce.eval_steps(2, 0) == [0, 2]  # interval 0 (--quick): start and end only


def test_rebuilt_reward_model_keeps_the_recorded_normalisation():
    ce = _study()
    before = {"dir": "/w/bt_reward_model", "requested_pairs": 3000, "seed": 0, "score_mean": 0.5, "score_std": 2.0}
    rebuilt = {**before, "score_mean": 0.50002, "score_std": 2.0001, "held_out_accuracy": {"all": 0.8}}
    kept = ce.same_reward_model(rebuilt, before)  # 4e-5 / 5e-5 relative: the same RM up to rounding
    assert (kept["score_mean"], kept["score_std"]) == (0.5, 2.0)
    assert kept["rebuilt_score_drift"] == pytest.approx(5e-5) and kept["held_out_accuracy"] == {"all": 0.8}
    assert ce.same_reward_model(rebuilt, None) is rebuilt  # nothing recorded: the new RM as it is
    assert ce.same_reward_model(rebuilt, {**before, "requested_pairs": 300}) is rebuilt  # another RM
    with pytest.raises(SystemExit, match=r"mean 0.6 / std 2.*0.5 / 2.*--fresh"):
        ce.same_reward_model({**rebuilt, "score_mean": 0.6}, before)
