"""The rollout engine interface: what the trainer needs from a generation backend.

Standard library, torch and :mod:`megatron_rpp.algorithms` only; a backend (e.g.
:class:`~megatron_rpp.rollout.vllm_engine.VllmEngine`) imports its own heavy dependencies.

Log-prob convention (every backend must follow it, the trainer relies on it):
``Response.log_probs[t]`` is the log-probability of the sampled token under the
distribution the engine actually sampled from (after temperature, top-k and top-p).
With top-k and top-p disabled (the RL default) that is

    log_probs[t] = log_softmax(logits_t / temperature)[token_t]

With top-k/top-p enabled it is renormalised over the kept tokens (the true sampling
distribution); the trainer's ``log_softmax(logits / temperature)`` then differs for
those tokens, and the per-step gap metrics (``self_check.log_prob_gap_metrics``) show it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch

from megatron_rpp.algorithms import HyperparameterError, check_range


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses. Validated on construction."""

    temperature: float = 1.0
    """Softmax temperature (> 0). 0 means greedy; log-probs are then of the unscaled softmax."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]. 1 disables it (the RL default: unbiased sampling)."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables it."""
    max_tokens: int = 256
    """Maximum number of generated tokens per response."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation stops after any of these tokens (the stop token is included in the response)."""
    n: int = 1
    """Responses per prompt."""
    seed: int | None = None
    """Sampling seed; None draws from the engine's own generator. Same seed, weights and
    prompts -> same responses."""

    def __post_init__(self) -> None:
        owner = "SamplingConfig"
        check_range(owner, "temperature", self.temperature, 0.0, math.inf, high_open=True)
        check_range(owner, "top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not _is_int(self.top_k) or self.top_k == 0 or self.top_k < -1:
            raise HyperparameterError(owner, "top_k", f"must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        for name in ("max_tokens", "n"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise HyperparameterError(owner, name, f"must be an integer >= 1, got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise HyperparameterError(owner, "seed", f"must be None or an integer, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Response:
    """One sampled response.

    Shape: token_ids [T] (a list of ints), log_probs [T] fp32.
    """

    prompt_index: int
    """Index of the prompt in the ``generate`` call."""
    sample_index: int
    """0 .. n-1 among the prompt's samples."""
    token_ids: list[int]
    log_probs: torch.Tensor
    """The engine's log-prob of each sampled token (see the module doc for the exact distribution)."""
    finish_reason: str
    """``"stop"`` (a stop/EOS token) or ``"length"`` (``max_tokens`` reached)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend living in the trainer rank's process (colocated)."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Response]:
        """``sampling.n`` responses per prompt, ordered prompt-major:
        ``[p0s0, p0s1, ..., p1s0, ...]``."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights in place from HF-named full tensors. The iterable is consumed
        once, lazily, in order (it may be a generator doing communication)."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory (weights, KV cache) for training; no-op where unsupported."""
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-acquire memory released by :meth:`sleep` (``["weights"]``, ``["kv_cache"]`` or all)."""
        ...

    def shutdown(self) -> None:
        """Free the engine. The object must not be used afterwards."""
        ...
