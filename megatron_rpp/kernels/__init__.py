"""Fused vocab-parallel log-prob / entropy / KL kernels (Triton on CUDA, chunked torch elsewhere).

Public entry points (one autograd implementation each; the backend is chosen by device,
``MEGATRON_RPP_KERNEL_BACKEND=torch|triton`` overrides):

- :func:`vocab_parallel_log_probs` — from this rank's logits shard [..., V/tp].
- :func:`vocab_parallel_log_probs_and_kl` — the same plus a per-token KL estimate.
- :func:`fused_linear_log_probs` (+ ``_and_kl``) — from hidden states and the output
  layer's weight shard, never materialising the logits.

See docs/kernels.md. Importing this package imports torch only (Triton on first use).
"""

from megatron_rpp.kernels.backends import BACKEND_ENV, resolve_backend
from megatron_rpp.kernels.fused_linear import fused_linear_log_probs, fused_linear_log_probs_and_kl
from megatron_rpp.kernels.log_probs import LogProbsAndKL, vocab_parallel_log_probs, vocab_parallel_log_probs_and_kl

__all__ = [
    "BACKEND_ENV",
    "LogProbsAndKL",
    "fused_linear_log_probs",
    "fused_linear_log_probs_and_kl",
    "resolve_backend",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_kl",
]
