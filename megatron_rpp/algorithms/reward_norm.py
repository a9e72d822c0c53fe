"""Running reward normalisation across training steps.

Shape letters: N rewards in one update (any shape; flattened).

Keeps the count, mean and sum of squared deviations (M2) of every reward seen so far in
float64 Python floats, merged batch by batch with Chan et al.'s parallel update (exact,
order-independent up to rounding). Semantics are **update-then-normalize**: each step
calls ``update(rewards)`` with the step's rewards, then ``normalize(rewards)``, so the
current batch is part of the statistics it is normalised with (and the first step is
well defined). ``normalize`` uses the population variance floored at ``eps``:

    r̂ = (r − mean) / sqrt(max(var, eps)),  optionally clipped to [−clip, clip]

(``shift_mean=False`` only divides by the std). The state is plain Python numbers, so it
goes into any checkpoint via ``state_dict`` / ``load_state_dict``. In data-parallel
training, update with the rewards of the whole batch (the controller has them all).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from megatron_rpp.algorithms._checks import check_tensor

__all__ = ["RunningRewardNorm"]


class RunningRewardNorm:
    """Running mean / std of rewards across steps (see module docstring).

    Args:
        eps: variance floor (> 0) used by ``normalize``.
        shift_mean: subtract the running mean (True) or only divide by the std (False).
    """

    def __init__(self, eps: float = 1e-8, shift_mean: bool = True) -> None:
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.shift_mean = bool(shift_mean)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        """Population variance of everything seen (0 before any update)."""
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, rewards: Tensor) -> None:
        """Merge a batch of rewards into the running statistics.

        Shape:
            rewards: [N] (any shape; flattened). Non-finite values are an error.
        """
        x = check_tensor(rewards, "rewards").detach().reshape(-1).to(torch.float64)
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ValueError("rewards must be finite")
        n_b = x.numel()
        mean_b = float(x.mean())
        m2_b = float((x - mean_b).square().sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    def normalize(self, rewards: Tensor, clip: float | None = None) -> Tensor:
        """(r − mean)/sqrt(max(var, eps)), clipped to ±clip if given; same shape and dtype.

        Shape:
            rewards: [N] (any shape); returns the same shape.
        """
        check_tensor(rewards, "rewards")
        if self.count == 0:
            raise RuntimeError("RunningRewardNorm.normalize called before any update")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be None or > 0, got {clip!r}")
        scale = 1.0 / math.sqrt(max(self.var, self.eps))
        shift = self.mean if self.shift_mean else 0.0
        dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
        out = ((rewards.to(torch.float64) - shift) * scale).to(dtype)
        return out if clip is None else out.clamp(-clip, clip)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: plain Python ints and floats."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "eps": self.eps, "shift_mean": self.shift_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"RunningRewardNorm state is missing {sorted(missing)}")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.eps = float(state.get("eps", self.eps))
        self.shift_mean = bool(state.get("shift_mean", self.shift_mean))

    def __repr__(self) -> str:
        return f"RunningRewardNorm(count={self.count}, mean={self.mean:.6g}, std={self.std:.6g})"
