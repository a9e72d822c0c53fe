"""The controller's side of engine groups and the worker's engine settings (pure, no model, no engine).

A transport that records what each rank is sent stands in for the worker group; the code
under test is the real ``phases.generate`` and the real ``Layout``.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.data.prompts import Prompt
from megatron_rpp.data.rollout_batch import RolloutBatch
from megatron_rpp.rollout.engine import SamplingConfig
from megatron_rpp.trainer import phases
from megatron_rpp.trainer.worker import engine_memory_kwargs, external_launcher_env


class Transport:
    """Per-rank calls as a Ray group makes them; rank r answers like a worker of engine group r // k."""

    def __init__(self, world: int, k: int, *, everyone_answers: bool = False, leader_repeats: int = 1):
        self.size, self.k, self.sent = world, k, []
        self.everyone_answers, self.leader_repeats = everyone_answers, leader_repeats

    def call(self, method, per_rank_args=None, **kwargs):
        assert method == "generate"
        self.sent = per_rank_args
        outs = []
        for r, (prompts, sampling, seed) in enumerate(per_rank_args):
            leader = r % self.k == 0
            ids = [prompts.prompt_ids[p, : int(n)].tolist() for p, n in enumerate(prompts.prompt_lengths)]
            rows = [(i, [seed, j]) for i in range(len(ids)) for j in range(sampling.n)]
            batch = RolloutBatch.from_sequences([ids[i] for i, _ in rows], [resp for _, resp in rows],
                                                group_index=prompts.group_index[[i for i, _ in rows]],
                                                rollout_log_probs=[torch.zeros(2) for _ in rows])
            if leader:
                batch = RolloutBatch.cat([batch] * self.leader_repeats)
            outs.append(batch if leader or self.everyone_answers else None)
        return outs


def _infos(world: int, k: int) -> list[dict]:
    return [{"rank": r, "dp_rank": 0, "dp_size": 1, "reporter": r == 0, "engine_group": r // k,
             "engine_groups": world // k, "engine_leader": r % k == 0} for r in range(world)]


@pytest.mark.parametrize("world,k", [(4, 2), (4, 4), (2, 1), (8, 2)])
def test_each_engine_group_gets_one_slice_one_seed_and_returns_once(world, k):
    prompts = [Prompt(text=f"p{i}", token_ids=[1, 10 + i], sample={}) for i in range(5)]
    layout = phases.Layout.from_infos(_infos(world, k))
    group = Transport(world, k)
    batch = phases.generate(group, layout, prompts, SamplingConfig(n=2), rng_seed=7)
    groups = [group.sent[r] for r in range(world)]
    for r in range(world):  # same prompts and seed within a group
        leader = groups[(r // k) * k]
        assert torch.equal(groups[r][0].prompt_ids, leader[0].prompt_ids) and groups[r][2] == leader[2]
    assert sorted({g[2] for g in groups}) == [7 * 1009 + e for e in range(world // k)]  # one seed per group
    assert len(batch) == 10 and batch.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [batch.response_list(b)[1] for b in range(len(batch))] == [0, 1] * 5  # prompt-major, n in order


def test_samples_are_taken_once_per_group():
    prompts = [Prompt(text="p", token_ids=[1, 2], sample={}) for _ in range(4)]
    layout = phases.Layout.from_infos(_infos(4, 2))
    # Non-leaders' answers (e.g. a worker returning its copy) are never read: no duplicate samples.
    assert len(phases.generate(Transport(4, 2, everyone_answers=True), layout, prompts, SamplingConfig(n=1), 0)) == 4
    with pytest.raises(RuntimeError, match="8 samples for 4 prompts x n=1"):  # a leader answering twice
        phases.generate(Transport(4, 2, leader_repeats=2), layout, prompts, SamplingConfig(n=1), rng_seed=0)


class Rollout:
    kv_cache_gib, gpu_memory_utilization, sleep_level = 2.0, 0.4, 1


def test_kv_cache_bytes_only_on_cpu_and_sleep_mode_only_on_gpu():
    # On GPU an explicit kv_cache_memory_bytes would override gpu_memory_utilization.
    assert engine_memory_kwargs(Rollout, on_gpu=True) == {"gpu_memory_utilization": 0.4, "kv_cache_gib": None,
                                                          "enable_sleep_mode": True}
    assert engine_memory_kwargs(Rollout, on_gpu=False) == {"kv_cache_gib": 2.0}


def test_external_launcher_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert external_launcher_env(3, 4, on_gpu=True) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert external_launcher_env(3, 4, on_gpu=False)["LOCAL_RANK"] == "3"
    monkeypatch.setenv("LOCAL_RANK", "1")  # a launcher's own value wins
    assert external_launcher_env(3, 4, on_gpu=True)["LOCAL_RANK"] == "1"
