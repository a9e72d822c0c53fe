"""Fused output layer → log-probs: hidden @ weightᵀ never exists as a whole [N, V/tp] tensor.

The logits are produced one (token chunk × vocabulary chunk) tile at a time, reduced by
the backend's ``row_stats`` to per-row statistics and merged across vocabulary chunks
exactly like vocabulary shards across TP ranks (:func:`~megatron_rpp.kernels.shard_math.merge_stats`).
The backward recomputes each tile, turns it into dL/dlogits with the backend's ``grad``
and feeds it straight into the two matmuls for dL/dhidden and dL/dweight.

Tensor parallelism: ``weight`` is this rank's vocabulary shard of the output layer and
``hidden`` its full (replicated) input. The per-row statistics travel in one all-gather
(forward); dL/dhidden is all-reduced over ``tp_group`` in the backward, so this function
stands for the whole column-parallel output layer, its input copy-to-TP-region included.
With sequence parallelism, all-gather the hidden states first.

Matmuls run in the inputs' dtype on accelerators, and on CPUs that multiply bf16 in
hardware (AMX or AVX512-BF16; then bf16 logits, like the naive path and Megatron's output
layer). Other CPUs compute in fp32: their half-precision matmuls are orders of magnitude
slower. The statistics and gradients accumulate in fp32. Each tile is scratch: the
forward reduces it in place, the backward turns it into dL/dlogits in place.

Shape letters: N tokens ([...] flattens to N), H hidden, V/tp vocabulary shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpp.kernels.backends import native_cpu_matmul, resolve_backend
from megatron_rpp.kernels.log_probs import (
    LogProbsAndKL,
    Options,
    backward_coefficients,
    check_inputs,
    combine_across_tp,
    finish_forward,
)
from megatron_rpp.kernels.shard_math import ShardStats, empty_stats, localize_labels, merge_stats, target_logits

__all__ = ["fused_linear_log_probs", "fused_linear_log_probs_and_kl"]


def chunk_shape(device: torch.device, n_rows: int, n_cols: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one logits tile.

    Up to 4096 token rows: a micro-batch then fits one row of tiles, and dL/dweight of
    each vocabulary chunk is one matmul written in place, with no fp32 accumulator.
    CPU: ≤ 4096 × 1024 (16 MiB fp32); GPU: ≤ 4096 × 8192.
    """
    rows, cols = (4096, 1024) if device.type == "cpu" else (4096, 8192)
    return max(1, min(rows, n_rows)), max(1, min(cols, n_cols))


def _compute_dtype(t: Tensor) -> torch.dtype:
    if t.device.type != "cpu" or t.dtype == torch.float32 or native_cpu_matmul(t.dtype):
        return t.dtype
    return torch.float32


def _tiles(n_rows: int, n_cols: int, rows: int, cols: int):
    """(c0, c1, [(n0, n1), ...]) per vocabulary chunk: vocabulary outer, tokens inner."""
    row_ranges = [(n0, min(n0 + rows, n_rows)) for n0 in range(0, n_rows, rows)]
    for c0 in range(0, n_cols, cols):
        yield c0, min(c0 + cols, n_cols), row_ranges


class _FusedLinearLogProbs(torch.autograd.Function):
    """(hidden [N, H], weight [V/tp, H], labels [N], ref [N] | None) -> (log_probs, entropy | None, kl | None)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ref_log_probs: Tensor | None, opts: Options):
        rank, _ = opts.tp_rank_and_size()
        n_rows, shard = hidden.shape[0], weight.shape[0]
        real = opts.real_columns(shard)  # rows of weight past it are vocabulary padding: never multiplied
        cd = _compute_dtype(hidden)
        rows, cols = chunk_shape(hidden.device, n_rows, real)
        buffers = _TileBuffers(rows, cols, hidden.shape[1], cd, hidden.device)
        running: ShardStats | None = None
        for c0, c1, row_ranges in _tiles(n_rows, real, rows, cols):
            w = weight[c0:c1].to(cd)  # [v, H]
            lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
            entropy = torch.empty_like(lse) if opts.with_entropy else None
            target = torch.empty_like(lse)
            for n0, n1 in row_ranges:
                logits = buffers.logits(hidden[n0:n1].to(cd), w)  # [n, H] @ [H, v] -> [n, v]
                local = localize_labels(labels[n0:n1], rank * shard + c0, c1 - c0)
                target[n0:n1] = target_logits(logits, local, opts.temperature)  # before the tile is reused
                lse[n0:n1], ent = opts.backend.row_stats(logits, opts.temperature, opts.with_entropy, scratch=True)
                if entropy is not None:
                    entropy[n0:n1] = ent
            chunk = ShardStats(lse, entropy, target)
            running = chunk if running is None else _merge_two(running, chunk)
        if running is None:  # this rank's shard is all padding
            running = empty_stats(n_rows, opts.with_entropy, hidden.device)
        stats = combine_across_tp(running, opts)
        valid, log_probs, kl = finish_forward(stats, labels, ref_log_probs, opts.global_vocab(shard), opts)
        ctx.opts = opts
        ctx.set_materialize_grads(False)  # unused outputs (e.g. entropy kept for metrics) cost nothing
        ctx.save_for_backward(hidden, weight, labels, valid, stats.lse, stats.entropy, log_probs, ref_log_probs)
        return log_probs, stats.entropy, kl

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_kl):
        hidden, weight, labels, valid, lse, entropy, log_probs, ref_log_probs = ctx.saved_tensors
        opts: Options = ctx.opts
        coef, coef_entropy, grad_ref = backward_coefficients(
            opts, valid, log_probs, ref_log_probs, grad_log_probs, grad_entropy, grad_kl, ctx.needs_input_grad[3])
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rank, world = opts.tp_rank_and_size()
        n_rows, shard = hidden.shape[0], weight.shape[0]
        real = opts.real_columns(shard)
        cd = _compute_dtype(hidden)
        rows, cols = chunk_shape(hidden.device, n_rows, real)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_weight = torch.empty_like(weight) if need_w else None
        if need_w:
            grad_weight[real:].zero_()  # vocabulary padding rows: no gradient
        buffers = _TileBuffers(rows, cols, hidden.shape[1], cd, hidden.device)
        one_row_tile = rows >= n_rows  # dL/dweight of a vocabulary chunk is then one matmul, written in place
        gw_acc = None if one_row_tile or not need_w else torch.empty((cols, hidden.shape[1]), dtype=torch.float32,
                                                                      device=hidden.device)
        for c0, c1, row_ranges in _tiles(n_rows, real, rows, cols):
            w = weight[c0:c1].to(cd)  # [v, H]
            gw = None if gw_acc is None else gw_acc[: c1 - c0].zero_()
            for n0, n1 in row_ranges:
                h = hidden[n0:n1].to(cd)  # [n, H]
                logits = buffers.logits(h, w)  # [n, v]
                local = localize_labels(labels[n0:n1], rank * shard + c0, c1 - c0)
                g = opts.backend.grad(logits, local, lse[n0:n1], None if entropy is None else entropy[n0:n1],
                                      coef[n0:n1], None if coef_entropy is None else coef_entropy[n0:n1],
                                      opts.temperature, out=logits)  # dL/dlogits [n, v], in place
                if need_h:
                    buffers.add_mm(grad_hidden[n0:n1], g, w)  # [n, v] @ [v, H]
                if need_w and gw is None and cd == weight.dtype:
                    torch.mm(g.T, h, out=grad_weight[c0:c1])  # [v, n] @ [n, H]
                elif need_w and gw is None:
                    grad_weight[c0:c1] = g.T @ h  # fp32 tiles of a half-precision weight
                elif need_w:
                    buffers.add_mm(gw, g.T, h)  # [v, n] @ [n, H]
            if gw is not None:
                grad_weight[c0:c1] = gw
        if need_h:
            if world > 1:  # each rank saw only its vocabulary shard's contribution
                dist.all_reduce(grad_hidden, group=opts.tp_group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, grad_ref, None


def _merge_two(a: ShardStats, b: ShardStats) -> ShardStats:
    ent = None if a.entropy is None else torch.stack([a.entropy, b.entropy])
    return merge_stats(torch.stack([a.lse, b.lse]), ent, torch.stack([a.target, b.target]))  # [2, N] -> [N]


class _TileBuffers:
    """Memory reused by every tile of one call: the logits tile and, for half-precision
    matmuls, the product that is added to an fp32 accumulator. No allocation per tile."""

    def __init__(self, rows: int, cols: int, h_dim: int, dtype: torch.dtype, device: torch.device):
        self.tile = torch.empty(rows * cols, dtype=dtype, device=device)
        self.product = None if dtype == torch.float32 else torch.empty(max(rows, cols) * h_dim, dtype=dtype,
                                                                        device=device)

    def logits(self, h: Tensor, w: Tensor) -> Tensor:
        """h @ wᵀ into the tile buffer. Shape: h [n, H], w [v, H] -> [n, v] (contiguous)."""
        return torch.mm(h, w.T, out=self.tile[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0]))

    def add_mm(self, acc: Tensor, a: Tensor, b: Tensor) -> None:
        """acc += a @ b, accumulating in acc's dtype (fp32)."""
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
        else:
            n, m = a.shape[0], b.shape[1]
            acc.add_(torch.mm(a, b, out=self.product[: n * m].view(n, m)))


def _run(hidden, weight, labels, ref_log_probs, *, tp_group, temperature, with_entropy, kl_estimator, kl_clamp,
         vocab_size):
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError("hidden must be a floating-point tensor [..., H]")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V/tp, {hidden.shape[-1]}], got {list(getattr(weight, 'shape', []))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    check_inputs(labels, hidden.shape[:-1], ref_log_probs, temperature, kl_estimator, vocab_size)
    token_shape = labels.shape
    opts = Options(tp_group, float(temperature), bool(with_entropy), kl_estimator, float(kl_clamp),
                   resolve_backend(hidden.device), vocab_size)
    ref = ref_log_probs.reshape(-1) if ref_log_probs is not None else None
    log_probs, entropy, kl = _FusedLinearLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ref, opts)  # [..., H] -> [N, H]
    return (log_probs.view(token_shape), entropy.view(token_shape) if entropy is not None else None,
            kl.view(token_shape) if kl is not None else None)


def fused_linear_log_probs(hidden: Tensor, weight: Tensor, labels: Tensor, *, tp_group=None,
                           temperature: float = 1.0, with_entropy: bool = False, vocab_size: int | None = None):
    """log π(labels) with logits = hidden @ weightᵀ over the TP-sharded vocabulary, never materialised.

    Same semantics as :func:`~megatron_rpp.kernels.vocab_parallel_log_probs` applied to
    ``hidden @ weight.T``; differentiable with respect to ``hidden`` and ``weight``.
    ``vocab_size``: the real global vocabulary when ``weight`` has padding rows (token ids
    ≥ it): those rows are never multiplied and get zero gradient; None = all rows are tokens.

    Shape:
        hidden [..., H], weight [V/tp, H], labels [...] -> log_probs [...] fp32 (and entropy [...]).
    """
    log_probs, entropy, _ = _run(hidden, weight, labels, None, tp_group=tp_group, temperature=temperature,
                                 with_entropy=with_entropy, kl_estimator=None, kl_clamp=math.inf,
                                 vocab_size=vocab_size)
    return (log_probs, entropy) if with_entropy else log_probs


def fused_linear_log_probs_and_kl(hidden: Tensor, weight: Tensor, labels: Tensor, ref_log_probs: Tensor, *,
                                  kl_estimator: str = "k2", kl_clamp: float = 10.0, tp_group=None,
                                  temperature: float = 1.0, with_entropy: bool = False,
                                  vocab_size: int | None = None) -> LogProbsAndKL:
    """:func:`fused_linear_log_probs` plus the per-token KL estimate (see ``vocab_parallel_log_probs_and_kl``)."""
    if not isinstance(ref_log_probs, Tensor):
        raise TypeError("ref_log_probs must be a tensor")
    log_probs, entropy, kl = _run(hidden, weight, labels, ref_log_probs, tp_group=tp_group,
                                  temperature=temperature, with_entropy=with_entropy,
                                  kl_estimator=kl_estimator, kl_clamp=kl_clamp, vocab_size=vocab_size)
    return LogProbsAndKL(log_probs, kl, entropy)
