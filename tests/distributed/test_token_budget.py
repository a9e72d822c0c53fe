"""Token-budget micro-batches and token-balanced DP shards change nothing: the policy loss and
every gradient of one update equal those of fixed micro-batches, at DP=2 and against one rank
(DP=1), on the real GPTModel with Megatron DDP. Responses are length-skewed (4..60 tokens)."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

PROMPTS = [3, 9, 5, 12, 4, 7, 6, 10]
RESPONSES = [4, 60, 9, 33, 17, 5, 48, 12]


def _batch(vocab: int):
    from megatron_rpp.data.rollout_batch import RolloutBatch

    g = torch.Generator().manual_seed(7)
    batch = RolloutBatch.from_sequences([torch.randint(3, vocab, (p,), generator=g).tolist() for p in PROMPTS],
                                        [torch.randint(3, vocab, (r,), generator=g).tolist() for r in RESPONSES])
    mask = batch.response_mask
    adv = torch.randn(mask.shape, generator=g) * mask
    rollout = -torch.rand(mask.shape, generator=g) * mask
    # old log-probs a little off the policy: PPO ratios != 1, some of them clipped
    return batch.replace(advantages=adv, rollout_log_probs=rollout, old_log_probs=None)


def _update(cfg, layouts):
    """Per layout (name, dp_parts, micro_batch_size, max_tokens): the reporter's loss metrics and
    the full gradients after one policy update from the same initial weights."""
    import torch.distributed as dist

    from megatron_rpp.algorithms.policy_loss import PolicyLossConfig
    from megatron_rpp.data.rollout_batch import balanced_parts
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training
    from megatron_rpp.trainer.update import StepSettings, policy_update

    model, groups = build(cfg, 1, 1)
    init = {k: v.clone() for k, v in gather_full_params(model, groups).items()}
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-4))
    batch = _batch(cfg["vocab_size"])
    counts = {"tokens": batch.num_response_tokens, "seqs": len(batch), "max_response_len": max(RESPONSES)}
    out = {}
    for name, split, mbs, max_tokens in layouts:
        load_full_params(model, groups, init)
        if split == "balanced":
            part = balanced_parts(batch.sequence_lengths, groups.dp_size)[groups.dp_rank]
        else:  # contiguous near-equal parts, as RolloutBatch.split
            part = torch.arange(len(batch)).tensor_split(groups.dp_size)[groups.dp_rank]
        settings = StepSettings(temperature=0.9, fused_output_layer=True, micro_batch_size=mbs, max_tokens=max_tokens)
        metrics = policy_update(ddp, opt, groups, batch.select(part), counts,
                                PolicyLossConfig(clip_low=0.2, clip_high=0.2), settings)
        out[name] = {"metrics": metrics, "grads": gather_full_params(model, groups, grads=True),
                     "rows": len(part), "dp": dist.get_world_size()}
    return out


LAYOUTS = [("fixed", "contiguous", 2, 0), ("budget", "balanced", 2, 96), ("budget_big", "balanced", 2, 4096)]


def test_token_budget_and_balanced_dp_shards_equal_fixed_micro_batches():
    cfg = tiny_config("llama")
    dp2 = run_ranks(_update, 2, cfg, LAYOUTS)
    (dp1,) = run_ranks(_update, 1, cfg, LAYOUTS[:1])
    ref = dp1["fixed"]
    assert ref["metrics"]["loss"] != 0.0
    for rank in dp2:
        for name, *_ in LAYOUTS:
            got = rank[name]
            assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5, abs=1e-7), name
            assert got["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5), name
            for k, g_ref in ref["grads"].items():
                assert g_ref.abs().max() > 0, k
                torch.testing.assert_close(got["grads"][k], g_ref, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} {k}: {m}")
