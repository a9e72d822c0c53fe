"""Naive (materialising) reference implementations, for tests and benchmarks only.

These build the full [N, V] log-softmax — exactly what the fused kernels avoid — and
get their gradients from plain autograd. Pass float64 inputs for a ground truth.

Shape letters: N tokens ([...] flattens to N), V the whole vocabulary, H hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_log_probs", "naive_linear_log_probs"]


def naive_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0, with_entropy: bool = False,
                    dtype: torch.dtype = torch.float32):
    """log_softmax(logits / T) gathered at labels (0 where labels ∉ [0, V)), computed in ``dtype``.

    Shape: logits [..., V], labels [...] -> log_probs [...] (and entropy [...]).
    """
    log_sm = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # [..., V] in dtype
    valid = (labels >= 0) & (labels < logits.shape[-1])
    picked = log_sm.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(valid, picked, torch.zeros_like(picked))
    if not with_entropy:
        return log_probs
    p = log_sm.exp()
    entropy = -(p * torch.where(p > 0, log_sm, torch.zeros_like(log_sm))).sum(-1)
    return log_probs, entropy


def naive_linear_log_probs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                           with_entropy: bool = False, dtype: torch.dtype = torch.float32):
    """:func:`naive_log_probs` of ``hidden @ weight.T`` (logits materialised in hidden's dtype).

    Shape: hidden [N, H], weight [V, H], labels [N].
    """
    return naive_log_probs(hidden @ weight.T, labels, temperature, with_entropy, dtype)
