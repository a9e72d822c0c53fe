"""The fused log-prob kernels with the vocabulary sharded over TP=2 gloo ranks equal TP=1.

Both backends (Triton under the interpreter) and both entry points (logits shard,
fused linear) run in one 2-rank world. Labels sit in both shards and on the shard
boundary (V/2 − 1 | V/2); one is the padding label −100.

Vocabulary padding: the same V = 600 columns read as a padded vocabulary of REAL tokens
(``vocab_size=REAL``) at TP=2 equal TP=1 on the first REAL columns alone, unpadded; with
REAL = 450 rank 1 holds 150 real columns of 300, with REAL = 250 none (its shard is all
padding). The padding columns / weight rows get exactly zero gradient.
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
REALS = (450, 250)


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
    """One backend's outputs and gradients (the backend is chosen by the environment), plain and
    with the vocabulary read as padded (``padded{REAL}``); world 1 also computes the unpadded
    reference of each padded run (``real{REAL}``: the first REAL columns only, no vocab_size)."""
    res = _entry_points(logits[..., shard], labels, ref_log_probs, weights, hidden, out_weight[shard], group)
    world = 1 if group is None else dist.get_world_size(group)
    for real in REALS:
        padded_labels = labels.clone()
        padded_labels.view(-1)[:6] = torch.tensor([0, real - 1, real, V - 1, -100, V // 2 - 1])  # ends, padding ids
        res[f"padded{real}"] = _entry_points(logits[..., shard], padded_labels, ref_log_probs, weights, hidden,
                                             out_weight[shard], group, vocab_size=real)
        if world == 1:
            res[f"real{real}"] = _entry_points(logits[..., :real], padded_labels, ref_log_probs, weights, hidden,
                                               out_weight[:real], None)
    return res


def _entry_points(logits, labels, ref_log_probs, weights, hidden, out_weight, group, vocab_size=None) -> dict:
    x = logits.clone().requires_grad_()
    out = vocab_parallel_log_probs_and_kl(x, labels, ref_log_probs, kl_estimator="k3", tp_group=group,
                                          temperature=TEMPERATURE, with_entropy=True, vocab_size=vocab_size)
    _loss(out, weights).backward()
    plain = vocab_parallel_log_probs(logits, labels, tp_group=group, temperature=TEMPERATURE, vocab_size=vocab_size)
    h, w = hidden.clone().requires_grad_(), out_weight.clone().requires_grad_()
    lin = fused_linear_log_probs_and_kl(h, w, labels, ref_log_probs, kl_estimator="k2", tp_group=group,
                                        temperature=TEMPERATURE, with_entropy=True, vocab_size=vocab_size)
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


REPLICATED = ("log_probs", "entropy", "kl", "plain", "lin_log_probs", "lin_entropy", "lin_kl", "grad_hidden")


def _assert_tp_equals(ranks: list[dict], ref: dict, what: str, real: int | None = None) -> None:
    """Every rank's replicated outputs equal ``ref``; the ranks' vocabulary shards of the
    gradients concatenate to ``ref``'s (followed by zeros for the padding columns beyond ``real``)."""
    for rank, got in enumerate(ranks):
        for key in REPLICATED:
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{what} rank {rank} {key}: {m}")
    for key in ("grad_logits", "grad_weight"):  # vocabulary-sharded: the ranks' shards concatenate
        dim = -1 if key == "grad_logits" else 0
        full = torch.cat([got[key] for got in ranks], dim=dim)
        if real is not None:
            assert (full.narrow(dim, real, V - real) == 0).all(), f"{what} {key}: padding got a gradient"
            full = full.narrow(dim, 0, real)
        torch.testing.assert_close(full, ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {key}: {m}")


def test_tp2_equals_tp1():
    single = _run_all(0, 1, None)
    ranks = run_ranks(_tp_rank, 2)
    for backend, ref in single.items():
        _assert_tp_equals([res[backend] for res in ranks], ref, backend)
        assert ref["log_probs"].view(-1)[4] == 0 and ref["grad_logits"].abs().max() > 0
        for real in REALS:  # padded at TP=2 == unpadded at TP=1 (and padded at TP=1)
            unpadded = ref[f"real{real}"]
            _assert_tp_equals([res[backend][f"padded{real}"] for res in ranks], unpadded, f"{backend} V={real}", real)
            _assert_tp_equals([ref[f"padded{real}"]], unpadded, f"{backend} V={real} tp=1", real)
            assert (unpadded["log_probs"].view(-1)[2:5] == 0).all()  # ids REAL, V − 1 and −100: not tokens
