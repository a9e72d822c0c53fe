"""``trainer.optim.all_finite``: the gradient-buffer check before the optimizer step, against
``torch.isfinite(t).all()`` (the reference it replaced) and without its element-sized temporaries."""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.trainer.optim import all_finite

N = 100_003  # not a multiple of any vector width: the reduction's tail is covered too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, N // 2, N - 1])
def test_one_bad_element_anywhere_is_found(dtype, value, where):
    t = torch.randn(N, generator=torch.Generator().manual_seed(where)).to(dtype)
    assert all_finite(t)
    t[where] = value
    assert not all_finite(t)
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_mixed_bad_values_and_edges():
    t = torch.zeros(N)
    t[7], t[9] = float("inf"), float("nan")  # NaN must not hide behind an inf (or the reverse)
    assert not all_finite(t)
    t = torch.zeros(N)
    t[7], t[9] = float("inf"), float("-inf")
    assert not all_finite(t)
    big = torch.full((N,), torch.finfo(torch.float32).max)  # the largest finite values are finite
    big[::2] *= -1
    assert all_finite(big)
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor(3.0)) and not all_finite(torch.tensor(float("nan")))


def test_no_element_sized_temporary():
    from torch.profiler import ProfilerActivity, profile

    t = torch.randn(4_000_000)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert all_finite(t)
    allocated = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    # isfinite(t).all() allocates abs (4 B/element) + three bool tensors: 28 MB here
    assert allocated < 1024, f"all_finite allocated {allocated} bytes for a {t.numel()}-element buffer"
