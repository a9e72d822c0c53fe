"""A real Megatron DDP + Megatron optimizer step on gloo ranks lowers the loss; DP replicas agree."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed


def _train(cfg, tp, pp, steps):
    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.parallel.gather import gather_full_params
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    model, groups = build(cfg, tp, pp)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3, clip_grad=1.0))
    g = torch.Generator().manual_seed(100 + groups.dp_rank)  # each DP replica sees different data
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16), generator=g)
    # Global token count over all DP replicas: every replica has 2 x 15 target tokens.
    n_global = 2 * 15 * groups.dp_size

    def loss_fn(logits, mb):  # logits [B, S, V/tp] -> per-token NLL of the next token
        nll = vocab_parallel_cross_entropy(logits[:, :-1].transpose(0, 1).contiguous().float(),
                                           mb.input_ids[:, 1:].t().contiguous())
        return nll.sum() / n_global, {"nll_sum": nll.detach().sum()}

    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = forward_backward(ddp, [MicroBatch(tokens)], loss_fn, groups, forward_only=False)
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm is not None and grad_norm > 0
        if out:
            local = out[0]["nll_sum"].reshape(1)
            dist.all_reduce(local, group=groups.dp_group)
            losses.append(float(local) / n_global)
    params = gather_full_params(model, groups)
    return {"losses": losses, "dp_rank": groups.dp_rank, "params": params if groups.tp_rank == 0 else None}


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 1, 2)], ids=["tp2", "dp2"])
def test_training_step_lowers_loss_and_keeps_replicas_equal(tp, pp, world):
    res = run_ranks(_train, world, tiny_config("llama"), tp, pp, 4)
    losses = [r["losses"] for r in res if r["losses"]]
    assert losses, "no rank reported a loss"
    first, last = losses[0][0], losses[0][-1]
    assert last < first - 0.05, f"loss did not decrease: {losses[0]}"
    if world // (tp * pp) > 1:  # DP replicas hold bitwise-identical weights after the steps
        p0, p1 = (r["params"] for r in res if r["params"] is not None)
        for name in p0:
            assert torch.equal(p0[name], p1[name]), name
