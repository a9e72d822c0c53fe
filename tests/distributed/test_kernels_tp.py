"""The fused log-prob kernels with the vocabulary sharded over TP=2 gloo ranks equal TP=1.

Both backends (Triton under the interpreter) and both entry points (logits shard,
fused linear) run in one 2-rank world. Labels sit in both shards and on the shard
boundary (V/2 − 1 | V/2); one is the padding label −100.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from megatron_rpp.kernels import (
    BACKEND_ENV,
    fused_linear_log_probs_and_kl,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_kl,
)
from megatron_rpp.parallel.spawn import run_ranks

pytestmark = pytest.mark.distributed

B, T, V, H = 2, 12, 600, 16
TEMPERATURE = 0.8


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[:5] = torch.tensor([0, V // 2 - 1, V // 2, V - 1, -100])
    ref_log_probs = -torch.rand(B, T, generator=g) * 8
    weights = torch.randn(3, B, T, generator=g)  # loss weights of log-probs, entropy, KL
    hidden = torch.randn(B, T, H, generator=g)
    out_weight = torch.randn(V, H, generator=g) * 0.5
    return logits, labels, ref_log_probs, weights, hidden, out_weight


def _loss(out, weights):
    return (weights[0] * out.log_probs + weights[1] * out.entropy + weights[2] * out.kl).sum()


def _run_all(rank: int, world: int, group) -> dict:
    """Everything on this rank's vocabulary shard; results per backend."""
    logits, labels, ref_log_probs, weights, hidden, out_weight = _data()
    shard = slice(rank * V // world, (rank + 1) * V // world)
    results = {}
    saved = os.environ.get(BACKEND_ENV)
    try:
        for backend in ("torch", "triton"):
            os.environ[BACKEND_ENV] = backend
            results[backend] = _run_backend(logits, labels, ref_log_probs, weights, hidden, out_weight, shard, group)
    finally:  # this also runs in the pytest process: never leak the backend into later tests' subprocesses
        if saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved
    return results


def _run_backend(logits, labels, ref_log_probs, weights, hidden, out_weight, shard, group) -> dict:
    """One backend's outputs and gradients (the backend is chosen by the environment)."""
    x = logits[..., shard].clone().requires_grad_()
    out = vocab_parallel_log_probs_and_kl(x, labels, ref_log_probs, kl_estimator="k3", tp_group=group,
                                          temperature=TEMPERATURE, with_entropy=True)
    _loss(out, weights).backward()
    plain = vocab_parallel_log_probs(logits[..., shard], labels, tp_group=group, temperature=TEMPERATURE)
    h, w = hidden.clone().requires_grad_(), out_weight[shard].clone().requires_grad_()
    lin = fused_linear_log_probs_and_kl(h, w, labels, ref_log_probs, kl_estimator="k2", tp_group=group,
                                        temperature=TEMPERATURE, with_entropy=True)
    _loss(lin, weights).backward()
    return {
        "log_probs": out.log_probs.detach(), "entropy": out.entropy.detach(), "kl": out.kl.detach(),
        "plain": plain, "grad_logits": x.grad,
        "lin_log_probs": lin.log_probs.detach(), "lin_entropy": lin.entropy.detach(),
        "lin_kl": lin.kl.detach(), "grad_hidden": h.grad, "grad_weight": w.grad,
    }


def _tp_rank() -> dict:
    group = dist.new_group(list(range(dist.get_world_size())))
    return _run_all(dist.get_rank(), dist.get_world_size(), group)


def test_tp2_equals_tp1():
    single = _run_all(0, 1, None)
    ranks = run_ranks(_tp_rank, 2)
    for backend, ref in single.items():
        for rank, res in enumerate(ranks):
            got = res[backend]
            for key in ("log_probs", "entropy", "kl", "plain", "lin_log_probs", "lin_entropy", "lin_kl",
                        "grad_hidden"):  # replicated on every rank
                torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{backend} rank {rank} {key}: {m}")
        for key in ("grad_logits", "grad_weight"):  # vocabulary-sharded: the ranks' shards concatenate
            dim = -1 if key == "grad_logits" else 0
            full = torch.cat([res[backend][key] for res in ranks], dim=dim)
            torch.testing.assert_close(full, ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{backend} {key}: {m}")
        assert ref["log_probs"].view(-1)[4] == 0 and ref["grad_logits"].abs().max() > 0
