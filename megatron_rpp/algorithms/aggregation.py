"""Reduce a per-token loss matrix to the scalar that is back-propagated.

Shape letters: B sequences in the (micro-)batch, T response tokens (padded).

Modes (n_b = number of valid tokens of sequence b, m = mask):

    token_mean               Σ_b Σ_t m·loss / N_tok          N_tok = global_token_count
                                                             (default: local Σ m)
    seq_mean_token_mean      Σ_b [Σ_t m·loss / n_b] / N_seq  N_seq = global_seq_count
                                                             (default: local B)
    seq_mean_token_sum_norm  Σ_b [Σ_t m·loss / T_norm] / N_seq   T_norm = max_response_len
                                                             (default: T). Dr. GRPO.

Every mode is a *sum* over sequences divided by a count. When the counts are the
global ones (whole mini-batch, all data-parallel ranks), the losses of the
micro-batches add up exactly to the loss of the full mini-batch, and so do their
gradients: micro-batches are summed, never averaged, and the result does not depend on
data-parallel size or micro-batching. The local defaults are only right for a single
un-split batch.

A sequence with no valid token contributes 0 (seq_mean_token_mean divides by
max(n_b, 1)); with the local default it still counts in N_seq = B.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import check_count, check_mask, check_shape, check_tensor
from megatron_rpp.algorithms.registry import Registry

__all__ = ["AGGREGATIONS", "Count", "aggregate"]

Count = Union[int, float, Tensor, None]
AggregateFn = Callable[[Tensor, Tensor, Count, Count, "int | None"], Tensor]

AGGREGATIONS: Registry[AggregateFn] = Registry("loss aggregation mode")


@AGGREGATIONS.register("token_mean")
def _token_mean(loss_sum: Tensor, mask: Tensor, tokens: Count, seqs: Count, max_len: int | None) -> Tensor:
    # loss_sum: [B, T] already masked -> scalar
    denom = mask.sum().clamp(min=1) if tokens is None else tokens
    return loss_sum.sum() / denom


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(loss_sum: Tensor, mask: Tensor, tokens: Count, seqs: Count, max_len: int | None) -> Tensor:
    per_seq = loss_sum.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # [B, T] -> [B]
    return per_seq.sum() / (max(loss_sum.shape[0], 1) if seqs is None else seqs)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def _seq_mean_token_sum_norm(
    loss_sum: Tensor, mask: Tensor, tokens: Count, seqs: Count, max_len: int | None
) -> Tensor:
    t_norm = loss_sum.shape[-1] if max_len is None else max_len
    per_seq = loss_sum.sum(dim=-1) / t_norm  # [B, T] -> [B]
    return per_seq.sum() / (max(loss_sum.shape[0], 1) if seqs is None else seqs)


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    global_token_count: Count = None,
    global_seq_count: Count = None,
    max_response_len: int | None = None,
) -> Tensor:
    """Masked reduction of a per-token loss to a scalar (see module docstring).

    Masked positions never reach the result or its gradient, even if they hold inf/NaN.

    Args:
        loss_mat: per-token loss.
        mask: 1 on response tokens (bool, or 0/1 integer/float).
        mode: a name in ``AGGREGATIONS``.
        global_token_count: N_tok for token_mean (int, float or scalar tensor).
        global_seq_count: N_seq for the seq_* modes.
        max_response_len: T_norm for seq_mean_token_sum_norm (default T).

    Shape:
        loss_mat: [B, T]; mask: [B, T]; returns [] (scalar).
    """
    if check_tensor(loss_mat, "loss_mat").dim() != 2:
        raise ValueError(f"loss_mat must be [B, T], got shape {list(loss_mat.shape)}")
    mask = check_mask(mask, "mask")
    check_shape(mask, loss_mat.shape, "mask")
    check_count(global_token_count, "global_token_count")
    check_count(global_seq_count, "global_seq_count")
    if max_response_len is not None and (not isinstance(max_response_len, int) or max_response_len <= 0):
        raise ValueError(f"max_response_len must be a positive int, got {max_response_len!r}")
    fn = AGGREGATIONS.get(mode)
    loss_sum = torch.where(mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    return fn(loss_sum, mask, global_token_count, global_seq_count, max_response_len)
