"""Pure per-shard math: statistics of disjoint shards merge into the whole-vocabulary values."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megatron_rpp.kernels.backends import TorchBackend
from megatron_rpp.kernels.shard_math import (
    ShardStats,
    localize_labels,
    merge_stats,
    pack_stats,
    target_logits,
    unpack_stats,
)


def _stats64(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    return lse, -(p * torch.log_softmax(z, -1)).sum(-1)


def test_merge_worked_example():
    # Two shards of one row, z = [0, 0 | 0, 0]: each shard has lse = log 2, entropy = log 2.
    # Whole row: lse = log 4; mixture weights 1/2 each -> entropy = Σ ½ (log 2 − log ½) = log 4.
    lse = torch.full((2, 1), math.log(2.0))
    merged = merge_stats(lse, lse.clone(), torch.tensor([[0.0], [0.0]]))
    torch.testing.assert_close(merged.lse, torch.tensor([math.log(4.0)]))
    torch.testing.assert_close(merged.entropy, torch.tensor([math.log(4.0)]))


def test_merge_of_uneven_shards_equals_whole_row():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 23, generator=g, dtype=torch.float64) * 4
    cuts = [0, 1, 9, 10, 23]  # shards of 1, 8, 1 and 13 columns
    parts = [_stats64(z[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    merged = merge_stats(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
                         torch.zeros(4, 5, dtype=torch.float64))
    lse, ent = _stats64(z)
    torch.testing.assert_close(merged.lse, lse, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.entropy, ent, rtol=0, atol=1e-12)


def test_merge_ignores_shards_without_mass():
    # A shard whose row is all −inf (lse −inf) contributes nothing, and no NaN appears.
    lse = torch.tensor([[0.5], [-math.inf]])
    merged = merge_stats(lse, torch.tensor([[1.25], [0.0]]), torch.tensor([[2.0], [0.0]]))
    assert merged.lse.item() == 0.5 and merged.entropy.item() == 1.25 and merged.target.item() == 2.0


def test_localize_labels_and_target_logits():
    labels = torch.tensor([0, 3, 4, 7, 8, -100])
    local = localize_labels(labels, vocab_start=4, shard_size=4)  # this shard holds ids 4..7
    assert local.tolist() == [-1, -1, 0, 3, -1, -1]
    logits = torch.arange(24.0).view(6, 4)
    assert target_logits(logits, local, temperature=2.0).tolist() == [0.0, 0.0, 4.0, 7.5, 0.0, 0.0]


def test_pack_unpack_roundtrip():
    s = ShardStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0]))
    lse, ent, tgt = unpack_stats(pack_stats(s).unsqueeze(0))
    assert lse[0].tolist() == [1.0, 2.0] and ent[0].tolist() == [3.0, 4.0] and tgt[0].tolist() == [5.0, 6.0]
    lse, ent, tgt = unpack_stats(pack_stats(s._replace(entropy=None)).unsqueeze(0))
    assert ent is None and tgt[0].tolist() == [5.0, 6.0]


def _triton_backend():
    from megatron_rpp.kernels.triton_kernels import TritonBackend

    return TritonBackend(block_n=2, block_v=2)  # −inf fills a whole column block of row 1


@pytest.mark.parametrize("make", [lambda: TorchBackend(chunk_elements=4), _triton_backend], ids=["torch", "triton"])
def test_backends_handle_minus_inf_logits(make):
    # Masked vocabulary entries (−inf) get probability 0 and gradient 0, never NaN.
    z = torch.tensor([[0.0, -math.inf, 0.0, math.log(2.0)], [-math.inf, -math.inf, 1.0, 1.0]])
    be = make()
    lse, ent = be.row_stats(z, 1.0, True)
    torch.testing.assert_close(lse, torch.tensor([math.log(4.0), 1.0 + math.log(2.0)]))
    # row 0: p = [¼, 0, ¼, ½] -> H = 1.5 log 2; row 1: H = log 2
    torch.testing.assert_close(ent, torch.tensor([1.5 * math.log(2.0), math.log(2.0)]))
    out = be.grad(z, torch.tensor([0, 2]), lse, ent, torch.ones(2), torch.ones(2), 1.0, torch.empty_like(z))
    assert torch.isfinite(out).all() and out[0, 1] == 0 and out[1, 0] == 0 and out[1, 1] == 0


def test_import_kernels_does_not_import_triton():
    code = "import sys, megatron_rpp.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
