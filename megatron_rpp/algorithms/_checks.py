"""Input validation shared by the public entry points of ``megatron_rpp.algorithms``.

Errors are ``ValueError`` (bad values / shapes) or ``TypeError`` (bad types) and name
the offending argument.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


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
