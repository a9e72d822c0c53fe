"""A NaN/inf loss or gradient on any rank skips the optimizer step on every rank."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.ranks import build
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed


def _rank(cfg, tp, pp):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.parallel.gather import gather_full_params
    from megatron_rpp.trainer.optim import OptimConfig, step_if_finite, wrap_for_training

    model, groups = build(cfg, tp, pp)
    ddp, opt = wrap_for_training(model, OptimConfig(lr=1e-3))
    tokens = torch.randint(0, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))

    def attempt(loss_scale=1.0, poison_rank=None):
        def loss_fn(logits, mb):
            nll = vocab_parallel_cross_entropy(logits[:, :-1].transpose(0, 1).contiguous().float(),
                                               mb.input_ids[:, 1:].t().contiguous())
            loss = nll.sum() / nll.numel() * loss_scale
            return loss, {"loss": loss.detach()}

        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = forward_backward(ddp, [MicroBatch(tokens)], loss_fn, groups, forward_only=False)
        if torch.distributed.get_rank() == poison_rank:  # an overflow in one rank's shard only
            ddp.buffers[0].grad_data[3] = float("inf")
        loss = out[0]["loss"] if out else torch.zeros(())
        before = {k: v.clone() for k, v in gather_full_params(model, groups).items()}
        applied, grad_norm = step_if_finite(ddp, opt, loss)
        after = gather_full_params(model, groups)
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        return applied, grad_norm is not None, changed

    results = {
        "nan_loss": attempt(loss_scale=float("nan")),
        "inf_grad_rank1": attempt(poison_rank=1),
        "good": attempt(),
    }
    results["adam_steps"] = {float(s["step"]) for s in opt.optimizer.state.values()}
    return results


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_nonfinite_step_is_skipped_on_every_rank(tp, pp):
    for r in run_ranks(_rank, 2, tiny_config("llama"), tp, pp):
        assert r["nan_loss"] == (False, False, False)
        assert r["inf_grad_rank1"] == (False, False, False)
        assert r["good"] == (True, True, True)
        assert r["adam_steps"] == {1.0}  # only the good step reached Adam
