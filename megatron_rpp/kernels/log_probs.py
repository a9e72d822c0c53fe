"""Vocab-parallel log-probs (+ entropy, + KL) of given logits: public entry points and autograd.

The naive ``log_softmax(logits.float(), -1).gather(-1, labels)`` materialises an fp32
[N, V] copy of the logits (and keeps it for backward). Here the forward reads each logit
once and keeps three fp32 numbers per row; the backward recomputes the softmax from the
saved per-row log-sum-exp. Across tensor-parallel ranks the per-shard statistics
(lse, entropy, target logit) travel in ONE all-gather of [tp, 2|3, N] fp32 — fewer
collectives than max-then-sum all-reduces — and combine exactly
(:func:`~megatron_rpp.kernels.shard_math.merge_stats`). The backward needs no communication.

Padding: a label outside [0, V) — e.g. the ignore index −100 — gives log-prob 0, KL 0 and
no gradient through them; entropy is still computed there. Callers mask padding
positions as usual; any label value is safe.

Vocabulary padding (``vocab_size=``, the real global vocabulary): a Megatron model whose
vocabulary is padded (``ModelSpec.for_tp``) has logit columns for token ids ≥ V that are
no tokens. Those columns are left out of every softmax (no probability mass, entropy over
the real vocabulary only) and get zero gradient; labels ≥ V count as not a token id. The
padding is a suffix of the global vocabulary, so on each rank the real columns are a
prefix of its shard (possibly empty). ``None`` (default): every column is a token.

Shape letters: N tokens (any leading shape [...] flattens to N), V vocabulary, V/tp the
shard of this rank (rank r holds token ids [r·V/tp, (r+1)·V/tp)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpp.algorithms.kl import KL_ESTIMATORS, kl_estimate, kl_estimate_grad
from megatron_rpp.kernels.backends import Backend, resolve_backend
from megatron_rpp.kernels.shard_math import (
    ShardStats,
    empty_stats,
    finish_log_probs,
    grad_coefficients,
    localize_labels,
    merge_stats,
    pack_stats,
    target_logits,
    unpack_stats,
)

__all__ = ["LogProbsAndKL", "vocab_parallel_log_probs", "vocab_parallel_log_probs_and_kl"]


class LogProbsAndKL(NamedTuple):
    log_probs: Tensor  # [...] fp32
    kl: Tensor  # [...] fp32, kl_estimate(log_probs, ref_log_probs); 0 at invalid labels
    entropy: Tensor | None  # [...] fp32 when with_entropy, else None


@dataclass(frozen=True)
class Options:
    """Everything but the tensors, shared by the logits and fused-linear autograd functions."""

    tp_group: Any
    temperature: float
    with_entropy: bool
    kl_estimator: str | None  # None: no KL
    kl_clamp: float
    backend: Backend
    vocab_size: int | None = None  # the real global vocabulary (columns at ids >= it are padding); None: all real

    def tp_rank_and_size(self) -> tuple[int, int]:
        if self.tp_group is None:
            return 0, 1
        return dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)

    def real_columns(self, shard: int) -> int:
        """How many leading columns of this rank's vocabulary shard are real token ids."""
        rank, world = self.tp_rank_and_size()
        if self.vocab_size is None:
            return shard
        if self.vocab_size > shard * world:
            raise ValueError(f"vocab_size={self.vocab_size} exceeds the sharded vocabulary ({shard} x {world} ranks)")
        return max(0, min(shard, self.vocab_size - rank * shard))

    def global_vocab(self, shard: int) -> int:
        """Token ids are [0, this): the real vocabulary, or every column when none is given."""
        return self.vocab_size if self.vocab_size is not None else shard * self.tp_rank_and_size()[1]


# ---- communication + epilogue shared by both autograd functions ---------------------------

# torch ≥ 2.13 renamed all_gather_into_tensor (deprecated alias kept) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor



def combine_across_tp(local: ShardStats, opts: Options) -> ShardStats:
    """Exact whole-vocabulary statistics from this rank's: one all-gather over the TP group."""
    packed = pack_stats(local)  # [2|3, N]
    _, world = opts.tp_rank_and_size()
    if world > 1:
        gathered = packed.new_empty((world * packed.shape[0], packed.shape[1]))
        _all_gather_single(gathered, packed, group=opts.tp_group)
        gathered = gathered.view(world, *packed.shape)  # [tp · (2|3), N] -> [tp, 2|3, N]
    else:
        gathered = packed.unsqueeze(0)
    return merge_stats(*unpack_stats(gathered))  # [tp, 2|3, N] -> [N] each


def finish_forward(stats: ShardStats, labels: Tensor, ref_log_probs: Tensor | None, vocab_size: int,
                   opts: Options) -> tuple[Tensor, Tensor, Tensor | None]:
    """(valid, log_probs, kl) from the whole-vocabulary statistics; all [N]."""
    valid = (labels >= 0) & (labels < vocab_size)
    log_probs = finish_log_probs(stats, valid)
    kl = None
    if ref_log_probs is not None:
        k = kl_estimate(log_probs, ref_log_probs.float(), opts.kl_estimator, opts.kl_clamp)
        kl = torch.where(valid, k, torch.zeros_like(k))
    return valid, log_probs, kl


def backward_coefficients(opts: Options, valid: Tensor, log_probs: Tensor, ref_log_probs: Tensor | None,
                          grad_log_probs, grad_entropy, grad_kl, need_ref_grad: bool):
    """Per-row (a, b) for ``Backend.grad`` and the gradient for ref_log_probs (or None)."""
    dkl = None
    if ref_log_probs is not None and grad_kl is not None:
        dkl = kl_estimate_grad(log_probs, ref_log_probs.float(), opts.kl_estimator, opts.kl_clamp)
    coef, coef_entropy = grad_coefficients(grad_log_probs, grad_entropy if opts.with_entropy else None,
                                           grad_kl, dkl, valid)
    grad_ref = None
    if need_ref_grad and dkl is not None:
        grad_ref = torch.where(valid, -grad_kl.float() * dkl, torch.zeros_like(dkl)).to(ref_log_probs.dtype)
    return coef, coef_entropy, grad_ref


class _VocabParallelLogProbs(torch.autograd.Function):
    """(logits [N, V/tp], labels [N], ref_log_probs [N] | None) -> (log_probs, entropy | None, kl | None)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ref_log_probs: Tensor | None, opts: Options):
        rank, _ = opts.tp_rank_and_size()
        shard = logits.shape[-1]
        real = opts.real_columns(shard)  # padded columns of the vocabulary are left out
        local_labels = localize_labels(labels, rank * shard, real)
        if real == 0:
            local = empty_stats(logits.shape[0], opts.with_entropy, logits.device)
        else:
            x = logits[:, :real]  # [N, V/tp] -> [N, real] (a view)
            lse, entropy = opts.backend.row_stats(x, opts.temperature, opts.with_entropy)
            local = ShardStats(lse, entropy, target_logits(x, local_labels, opts.temperature))
        stats = combine_across_tp(local, opts)
        valid, log_probs, kl = finish_forward(stats, labels, ref_log_probs, opts.global_vocab(shard), opts)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # unused outputs (e.g. entropy kept for metrics) cost nothing
        ctx.save_for_backward(logits, local_labels, valid, stats.lse, stats.entropy, log_probs, ref_log_probs)
        return log_probs, stats.entropy, kl

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_kl):
        logits, local_labels, valid, lse, entropy, log_probs, ref_log_probs = ctx.saved_tensors
        opts: Options = ctx.opts
        coef, coef_entropy, grad_ref = backward_coefficients(
            opts, valid, log_probs, ref_log_probs, grad_log_probs, grad_entropy, grad_kl, ctx.needs_input_grad[2])
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.empty_like(logits)
            real = opts.real_columns(logits.shape[-1])
            grad_logits[:, real:].zero_()  # padding columns: no gradient
            if real > 0:
                opts.backend.grad(logits[:, :real], local_labels, lse, entropy, coef, coef_entropy,
                                  opts.temperature, out=grad_logits[:, :real])
        return grad_logits, None, grad_ref, None


# ---- public entry points -------------------------------------------------------------------


def check_inputs(labels: Tensor, token_shape: torch.Size, ref_log_probs: Tensor | None, temperature: float,
                 kl_estimator: str | None, vocab_size: int | None = None) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int (the real vocabulary) or None, got {vocab_size!r}")
    if labels.shape != token_shape:
        raise ValueError(f"labels must have shape {list(token_shape)}, got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if ref_log_probs is not None and ref_log_probs.shape != token_shape:
        raise ValueError(f"ref_log_probs must have shape {list(token_shape)}, got {list(ref_log_probs.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if kl_estimator is not None:
        KL_ESTIMATORS.get(kl_estimator)  # unknown name -> error listing the valid ones


def _run(logits: Tensor, labels: Tensor, ref_log_probs: Tensor | None, *, tp_group, temperature: float,
         with_entropy: bool, kl_estimator: str | None, kl_clamp: float, vocab_size: int | None):
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError("logits must be a floating-point tensor [..., V/tp]")
    check_inputs(labels, logits.shape[:-1], ref_log_probs, temperature, kl_estimator, vocab_size)
    token_shape = labels.shape
    opts = Options(tp_group, float(temperature), bool(with_entropy), kl_estimator, float(kl_clamp),
                   resolve_backend(logits.device), vocab_size)
    logits_2d = logits.reshape(-1, logits.shape[-1])  # [..., V/tp] -> [N, V/tp]
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    ref = ref_log_probs.reshape(-1) if ref_log_probs is not None else None
    log_probs, entropy, kl = _VocabParallelLogProbs.apply(logits_2d, labels.reshape(-1), ref, opts)
    return (log_probs.view(token_shape), entropy.view(token_shape) if entropy is not None else None,
            kl.view(token_shape) if kl is not None else None)


def vocab_parallel_log_probs(logits: Tensor, labels: Tensor, *, tp_group=None, temperature: float = 1.0,
                             with_entropy: bool = False, vocab_size: int | None = None):
    """log π(labels) under softmax(logits / temperature) over the TP-sharded vocabulary.

    Args:
        logits: this rank's vocabulary shard of the logits (bf16 / fp16 / fp32).
        labels: global token ids; any value outside [0, V) (e.g. −100) gives log-prob 0.
        tp_group: the tensor-parallel group the vocabulary is sharded over; None = not sharded.
        temperature: the sampling temperature (log-probs are of logits / temperature).
        with_entropy: also return the entropy (nats) of softmax(logits / temperature).
        vocab_size: the real global vocabulary V when the logits carry padding columns
            (token ids ≥ V; module docstring); None = every column is a token.

    Shape:
        logits [..., V/tp], labels [...] -> log_probs [...] fp32 (and entropy [...] fp32).

    Differentiable with respect to ``logits``. Backend by device (Triton on CUDA, chunked
    torch elsewhere; ``MEGATRON_RPP_KERNEL_BACKEND`` overrides).
    """
    log_probs, entropy, _ = _run(logits, labels, None, tp_group=tp_group, temperature=temperature,
                                 with_entropy=with_entropy, kl_estimator=None, kl_clamp=math.inf,
                                 vocab_size=vocab_size)
    return (log_probs, entropy) if with_entropy else log_probs


def vocab_parallel_log_probs_and_kl(logits: Tensor, labels: Tensor, ref_log_probs: Tensor, *,
                                    kl_estimator: str = "k2", kl_clamp: float = 10.0, tp_group=None,
                                    temperature: float = 1.0, with_entropy: bool = False,
                                    vocab_size: int | None = None) -> LogProbsAndKL:
    """:func:`vocab_parallel_log_probs` plus the per-token KL estimate in the same pass.

    ``kl = kl_estimate(log_probs, ref_log_probs, kl_estimator, kl_clamp)`` (see
    ``megatron_rpp.algorithms.kl``), 0 where the label is not a token id. Its gradient
    reaches the logits through the same single backward pass as the log-probs' (and
    ``ref_log_probs`` when it requires grad). A KL loss thus costs no extra vocabulary pass.

    Shape:
        logits [..., V/tp], labels [...], ref_log_probs [...] -> each output [...] fp32.
    """
    if not isinstance(ref_log_probs, Tensor):
        raise TypeError("ref_log_probs must be a tensor")
    log_probs, entropy, kl = _run(logits, labels, ref_log_probs, tp_group=tp_group, temperature=temperature,
                                  with_entropy=with_entropy, kl_estimator=kl_estimator, kl_clamp=kl_clamp,
                                  vocab_size=vocab_size)
    return LogProbsAndKL(log_probs, kl, entropy)
