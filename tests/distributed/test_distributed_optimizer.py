"""The distributed optimizer (``trainer.distributed_optimizer``) takes the plain optimizer's steps and
holds 1/DP of its state.

Two copies of one model in one gloo world, one per optimizer, train on the same per-DP-rank data
(the trainer's ``forward_backward`` over micro-batches): losses, gradient norms and weights after
every step must agree. Gradients are summed over the DP ranks in both (all-reduce vs
reduce-scatter of the same two addends), so the steps agree to fp32 rounding of the norm
(measured: weights bitwise equal, grad norms within 1e-7 relative); the bound 1e-6 is far below
the lr = 1e-3 Adam update that each step moves every weight by.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.distributed

STEPS, SEQ, MICRO = 2, 12, 2


def _step(ddp, opt, groups, vocab: int, step: int) -> tuple[float, float]:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_rpp.models.pipeline import MicroBatch, forward_backward
    from megatron_rpp.trainer.optim import step_if_finite, zero_grad

    g = torch.Generator().manual_seed(100 * step + groups.dp_rank)  # each DP rank its own data
    tokens = torch.randint(0, vocab, (2 * MICRO, SEQ), generator=g)
    n_global = tokens.shape[0] * (SEQ - 1) * groups.dp_size

    def loss_fn(logits, mb):  # [b, S, V/tp] -> the micro-batch's share of the global mean NLL
        nll = vocab_parallel_cross_entropy(logits[:, :-1].transpose(0, 1).contiguous().float(),
                                           mb.input_ids[:, 1:].t().contiguous())
        return nll.sum() / n_global, {"loss": nll.sum().detach() / n_global}

    zero_grad(ddp, opt)
    aux = forward_backward(ddp, [MicroBatch(t) for t in tokens.split(MICRO)], loss_fn, groups, forward_only=False)
    loss = torch.stack([a["loss"] for a in aux]).sum().reshape(1) if aux else torch.zeros(1)
    ok, grad_norm = step_if_finite(ddp, opt, loss)
    assert ok
    if groups.is_last_stage:
        dist.all_reduce(loss, group=groups.dp_group)
    return float(loss), float(grad_norm)


def _state_numel(opt) -> int:
    """Optimizer-state elements this rank holds (Adam moments and fp32 main params)."""
    inner = getattr(opt, "chained_optimizers", [opt])
    return sum(t.numel() for o in inner for s in o.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def _compare(cfg, tp, pp, vpp):
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.provider import build_model
    from megatron_rpp.parallel.gather import gather_full_params, load_full_params
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

    groups = initialize_parallel(tp, pp, vpp=vpp)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(tp)
    models = [build_model(spec, groups) for _ in range(2)]
    load_full_params(models[1], groups, gather_full_params(models[0], groups))
    runs = [wrap_for_training(m, OptimConfig(lr=1e-3, use_distributed_optimizer=dist_opt))
            for m, dist_opt in zip(models, (False, True))]
    out = {"loss": [], "grad_norm": [], "max_weight_diff": [], "moved": []}
    start = gather_full_params(models[0], groups)
    for step in range(STEPS):
        (l0, g0), (l1, g1) = (_step(ddp, opt, groups, cfg["vocab_size"], step) for ddp, opt in runs)
        w0, w1 = (gather_full_params(m, groups) for m in models)
        out["loss"].append((l0, l1))
        out["grad_norm"].append((g0, g1))
        out["max_weight_diff"].append(max(float((w0[k] - w1[k]).abs().max()) for k in w0))
        out["moved"].append(min(float((w0[k] - start[k]).abs().max()) for k in w0))
    out["state_numel"] = [_state_numel(opt) for _, opt in runs]
    out["dp"] = groups.dp_size
    return out


@pytest.mark.parametrize("tp,pp,vpp,world", [
    (1, 1, 1, 2),
    # 2 micro-batches = PP: stage 0 runs every forward as warm-up, which hung in megatron-core's
    # shape exchange until parallel/pipeline_fixes.py (issue 15); run_ranks' timeout fails a hang.
    (1, 2, 2, 4),
], ids=["dp2", "pp2-vpp2-dp2"])
def test_distributed_optimizer_equals_plain(tp, pp, vpp, world):
    cfg = tiny_config("llama", tied=True)
    for r in run_ranks(_compare, world, cfg, tp, pp, vpp, timeout=900):
        print(r)
        assert r["dp"] == 2
        for (l0, l1), (g0, g1) in zip(r["loss"], r["grad_norm"]):
            assert abs(l0 - l1) <= 1e-6 and abs(g0 - g1) <= 1e-6 * g0, r
        assert max(r["max_weight_diff"]) <= 1e-6, r
        assert min(r["moved"]) > 5e-4, r  # every parameter moved by ~lr each step: a real comparison
        plain, sharded = r["state_numel"]
        # 1/DP of the state (Megatron pads each DP shard of a bucket: allow 1 %)
        assert sharded <= 0.51 * plain, (plain, sharded)
