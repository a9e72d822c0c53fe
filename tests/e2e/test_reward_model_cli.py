"""End-to-end: the real CLI trains a tiny policy with a Bradley-Terry reward model's rewards.

Real vLLM rollouts, real Megatron policy / reference / reward-model shards on one worker.
The reward model is a tiny random ``LlamaForSequenceClassification`` sharing SmolLM2's
tokenizer with the tiny policy. Independent check: the step-0 evaluation (greedy, so
deterministic) is redone with transformers alone — greedy generation from the policy,
then HF's sequence-classification score, then the static normalisation — and must give
the same mean reward.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testlib.tiny_hf import make_tiny_hf_dir, make_tiny_reward_hf_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
TRAIN_PROMPTS = ["Write a haiku about the sea.", "Give me three tips for learning to cook.",
                 "Explain what a rainbow is to a child.", "Suggest a name for a grey cat.",
                 "What should I pack for a weekend hike?", "Describe your favourite breakfast.",
                 "How do I politely decline an invitation?", "Tell me a fun fact about owls."]
EVAL_PROMPTS = ["Say something kind.", "Recommend a book for a rainy day.", "What is a good first programming language?"]
MODEL_MEAN, MODEL_STD = 0.25, 2.0


def _write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def hf_eval_reward_mean(policy_dir: Path, rm_dir: Path, run_dir: Path) -> float:
    """Step-0 eval reward, with transformers only: greedy responses, HF RM scores, normalised."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from megatron_rpp.config import load_config
    from megatron_rpp.data.prompts import load_rows, tokenize_prompts

    cfg = load_config(run_dir / "config.yaml")
    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    prompts, _ = tokenize_prompts(load_rows(cfg.data)[1], tok, cfg.data, cfg.model.max_prompt_length)
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(str(rm_dir), dtype=torch.float32).eval()
    rewards = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.token_ids])
            seq = policy.generate(ids, max_new_tokens=cfg.model.max_response_length, do_sample=False)
            score = float(rm(input_ids=seq).logits[0, 0])  # batch of one: HF pools at the last token
            rewards.append((score - MODEL_MEAN) / MODEL_STD)
    return sum(rewards) / len(rewards)


def test_train_with_reward_model(tmp_path):
    policy = make_tiny_hf_dir(tmp_path.parent / "tiny_llama_hf")
    rm = make_tiny_reward_hf_dir(tmp_path.parent / "tiny_llama_rm_hf")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rpp.cli", "train",
           f"model.hf_dir={policy}", "model.max_prompt_length=96", "model.max_response_length=16",
           "data.source=jsonl", f"data.path={_write_jsonl(tmp_path / 'train.jsonl', TRAIN_PROMPTS)}",
           f"data.eval_path={_write_jsonl(tmp_path / 'eval.jsonl', EVAL_PROMPTS)}",
           f"reward.model_dir={rm}", f"reward.model_mean={MODEL_MEAN}", f"reward.model_std={MODEL_STD}",
           "reward.num_workers=0", "rollout.rollout_batch_size=4", "rollout.n_samples_per_prompt=2",
           "trainer.train_batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-4", "algorithm.kl_coef=0.01",
           "trainer.num_workers=1", "trainer.steps=2", "trainer.export_hf=false", f"trainer.output_dir={out}",
           "trainer.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for k in ("reward/mean", "reward/std", "grad_norm", "kl/mean", "timing/reward"):
            assert math.isfinite(r[k]), (k, r[k])
        assert r["reward/std"] > 0  # distinct scores per sample: the rewards come from the model
        assert r["grad_norm"] > 0
    assert rows[2]["kl/mean"] != 0.0  # the policy moved after one update

    expected = hf_eval_reward_mean(policy, rm, out)
    got = rows[0]["eval/reward_mean"]
    print(f"step-0 eval reward: trainer {got:.6f}, transformers {expected:.6f}, |diff| {abs(got - expected):.2e}")
    assert abs(got - expected) <= 1e-4
