"""Controller-side failure policy: skipped non-finite optimizer steps.

The workers skip an optimizer step whose loss or gradient is NaN/inf (see
:func:`megatron_rpp.trainer.optim.step_if_finite`) and report ``update_ok=False``;
the controller counts them here and stops the run after too many in a row.
"""
from __future__ import annotations


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped optimizer steps; raises after ``max_in_a_row`` consecutive ones."""

    def __init__(self, max_in_a_row: int, *, in_a_row: int = 0, total: int = 0):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, in_a_row, total

    def update(self, applied: list[bool], step: int) -> int:
        """Record the optimizer steps of one iteration (in order); returns how many were skipped."""
        skipped = 0
        for ok in applied:
            if ok:
                self.in_a_row = 0
                continue
            skipped += 1
            self.total += 1
            self.in_a_row += 1
            if self.in_a_row >= self.max_in_a_row:
                raise NonFiniteStepsError(
                    f"step {step}: {self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                    f"and were skipped (trainer.max_nonfinite_steps_in_a_row={self.max_in_a_row}); "
                    f"{self.total} skipped in total. Lower trainer.lr or check the rewards.")
        return skipped

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}
