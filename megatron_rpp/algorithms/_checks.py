"""Input validation shared by the public entry points of ``megatron_rpp.algorithms``.

Errors are ``ValueError`` (bad values / shapes) or ``TypeError`` (bad types) and name
the offending argument.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class HyperparameterError(ValueError):
    """A field of a hyperparameter dataclass has a bad value: ``"<owner>.<field>: <problem>"``.

    ``owner`` (the dataclass name), ``field`` and ``problem`` (e.g. ``"must be a number in (0, 1],
    got 2.0"``) are kept apart, so a config loader can name its own key instead
    (``algorithm.gamma: must be a number in (0, 1], got 2.0``).
    """

    def __init__(self, owner: str, field: str, problem: str) -> None:
        super().__init__(f"{owner}.{field}: {problem}")
        self.owner, self.field, self.problem = owner, field, problem


def is_number(x: object) -> bool:
    """A real number (int or float, not bool) that is not NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def describe_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """Words for an interval: ``"a number in (0, 1]"``, ``"a finite number >= 0"``, ``"a number > 0 (inf allowed)"``."""
    lo = f"{'>' if low_open else '>='} {low:g}"
    hi = f"{'<' if high_open else '<='} {high:g}"
    if high == math.inf:
        return f"a finite number {lo}" if high_open else f"a number {lo} (inf allowed)"
    if low == -math.inf:
        return f"a finite number {hi}" if low_open else f"a number {hi} (-inf allowed)"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(
    owner: str, field: str, value: object, low: float = -math.inf, high: float = math.inf,
    *, low_open: bool = False, high_open: bool = False,
) -> None:
    """Raise :class:`HyperparameterError` unless ``value`` is a number in the interval (NaN never is)."""
    ok = is_number(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise HyperparameterError(owner, field, f"must be {describe_range(low, high, low_open, high_open)}, got {value!r}")


def accepts_positional(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when its signature is unknown)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_shape(x: object, shape: Sequence[int], name: str, *, floating: bool = False) -> Tensor:
    """Assert ``x`` is a tensor of exactly ``shape`` (and floating point if asked)."""
    x = check_tensor(x, name)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_mask(mask: object, name: str = "response_mask", ndim: int = 2) -> Tensor:
    """Validate a 0/1 mask (bool, or integer/float holding only 0 and 1); return it as bool.

    A non-bool mask is checked element-wise, which synchronises with the device; pass
    bool masks on hot paths.
    """
    mask = check_tensor(mask, name)
    if mask.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (or be bool)")
    return mask != 0


def check_count(count: object, name: str) -> None:
    """A global count must be positive when given as a Python number (tensors are not synced)."""
    if count is None or isinstance(count, Tensor):
        if isinstance(count, Tensor) and count.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {list(count.shape)}")
        return
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        raise TypeError(f"{name} must be an int, float or scalar tensor, got {type(count).__name__}")
    if not count > 0:
        raise ValueError(f"{name} must be > 0, got {count}")
