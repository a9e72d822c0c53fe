"""Per-shard math of the vocab-parallel log-prob kernels: small pure functions, no communication.

The vocabulary is split into contiguous shards (one per tensor-parallel rank, and, inside
the fused-linear path, into chunks of a rank's shard). Each shard reduces its slice of a
row to three numbers; shards combine exactly, in any grouping, with :func:`merge_stats`.

With z = logits / temperature (fp32), for one row and one shard S:

    lse_S     = log Σ_{v∈S} exp(z_v)                    local log-sum-exp
    entropy_S = − Σ_{v∈S} q_v log q_v,  q = softmax of z over S only
    target_S  = z_y if the label y lies in S, else 0

Merging shards (w_S = exp(lse_S − lse), the shard's share of the probability mass):

    lse       = log Σ_S exp(lse_S)
    entropy   = Σ_S w_S (entropy_S − log w_S)           (entropy of a mixture of disjoint supports)
    target    = Σ_S target_S

and then log π(y) = target − lse. Keeping entropy (not Σ p·z) in the statistics avoids
the cancellation lse − Σ p·z when logits are large.

Gradients (p = softmax(z), a = dL/dlog π(y), b = dL/dentropy):

    dL/dz_v = a (1[v = y] − p_v) − b p_v (log p_v + entropy)
    dL/dlogits_v = dL/dz_v / temperature

so the backward needs only the saved per-row lse and entropy, never a saved softmax.

Shape letters: N rows (flattened tokens), V/tp the vocabulary shard, k shards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ShardStats",
    "empty_stats",
    "localize_labels",
    "target_logits",
    "merge_stats",
    "pack_stats",
    "unpack_stats",
    "finish_log_probs",
    "grad_coefficients",
]


class ShardStats(NamedTuple):
    """Per-row statistics of one vocabulary shard (or of several, merged). All fp32 [N]."""

    lse: Tensor
    entropy: Tensor | None  # None when entropy was not asked for
    target: Tensor


def empty_stats(n_rows: int, with_entropy: bool, device: torch.device) -> ShardStats:
    """The statistics of a shard with no columns (all padding): no mass, so weight 0 in :func:`merge_stats`.

    Shape: -> ShardStats of [N] (lse −inf, entropy 0, target 0).
    """
    zeros = torch.zeros(n_rows, dtype=torch.float32, device=device)
    return ShardStats(torch.full_like(zeros, -torch.inf), zeros.clone() if with_entropy else None, zeros)


def localize_labels(labels: Tensor, vocab_start: int, shard_size: int) -> Tensor:
    """Global token ids -> index inside the shard [vocab_start, vocab_start + shard_size), else −1.

    Labels outside every shard (ignore-index −100, padding) map to −1 on every rank.

    Shape: labels [N] int -> [N] int64.
    """
    local = labels.long() - vocab_start
    in_shard = (local >= 0) & (local < shard_size)
    return torch.where(in_shard, local, torch.full_like(local, -1))


def target_logits(logits: Tensor, local_labels: Tensor, temperature: float) -> Tensor:
    """z_y = logits[n, y_n] / temperature where the label lies in this shard, else 0.

    Shape: logits [N, V/tp], local_labels [N] (−1 = not in shard) -> [N] fp32.
    """
    in_shard = local_labels >= 0
    picked = logits.gather(-1, local_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    return torch.where(in_shard, picked / temperature, torch.zeros_like(picked))


def merge_stats(lse: Tensor, entropy: Tensor | None, target: Tensor) -> ShardStats:
    """Combine the statistics of k disjoint shards of the same rows (see the module docstring).

    A shard whose rows are all −inf (lse_S = −inf) has weight 0 and contributes nothing.

    Shape: lse, entropy, target [k, N] -> ShardStats of [N].
    """
    total = torch.logsumexp(lse, dim=0)  # [k, N] -> [N]
    merged_entropy = None
    if entropy is not None:
        log_w = lse - total  # [k, N], ≤ 0
        term = torch.exp(log_w) * (entropy - log_w)
        merged_entropy = torch.where(log_w > -torch.inf, term, torch.zeros_like(term)).sum(dim=0)
    return ShardStats(total, merged_entropy, target.sum(dim=0))


def pack_stats(stats: ShardStats) -> Tensor:
    """Stack the statistics into one contiguous [2 or 3, N] fp32 tensor (one collective)."""
    parts = [stats.lse, stats.target] + ([stats.entropy] if stats.entropy is not None else [])
    return torch.stack([p.float() for p in parts])


def unpack_stats(packed: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """Inverse of :func:`pack_stats` for k stacked shards: [k, 2|3, N] -> lse, entropy, target [k, N]."""
    entropy = packed[:, 2] if packed.shape[1] == 3 else None
    return packed[:, 0], entropy, packed[:, 1]


def finish_log_probs(stats: ShardStats, valid: Tensor) -> Tensor:
    """log π(y) = z_y − lse over the whole vocabulary; 0 where the label is not a token id.

    Shape: stats of [N], valid [N] bool -> [N] fp32.
    """
    log_probs = stats.target - stats.lse
    return torch.where(valid, log_probs, torch.zeros_like(log_probs))


def grad_coefficients(
    grad_log_probs: Tensor | None,
    grad_entropy: Tensor | None,
    grad_kl: Tensor | None,
    dkl_dlog_probs: Tensor | None,
    valid: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Per-row (a, b) of the module docstring from the incoming gradients.

    a = (dL/dlog π + dL/dkl · dkl/dlog π) on valid rows, 0 elsewhere; b = dL/dentropy.

    Shape: every argument [N] (or None) -> a [N] fp32, b [N] fp32 or None.
    """
    coef = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if grad_log_probs is not None:
        coef = coef + grad_log_probs.float()
    if grad_kl is not None and dkl_dlog_probs is not None:
        coef = coef + grad_kl.float() * dkl_dlog_probs.float()
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    return coef, (grad_entropy.float() if grad_entropy is not None else None)
