"""Fixtures for the kernel tests: run a test once per backend (Triton under the interpreter)."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.kernels import BACKEND_ENV


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Force the log-prob backend for this test through the public override."""
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture
def rel_err():
    """rel_err(actual, expected) = max |actual − expected| / max |expected| (scale-free)."""
    return _rel_err
