"""The Megatron path on CUDA: NCCL ranks, CPU batches scored by a CUDA model, bf16 mixed precision.

Skipped without CUDA (conftest) and without megatron-core. benchmarks/gpu_check.py compares the
CUDA model's logits with the CPU fp32 reference and trains in bf16; these are the pytest checks
of the placement fixes.
"""
from __future__ import annotations

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks
from testlib.tiny_models import tiny_config

pytestmark = pytest.mark.gpu
pytest.importorskip("megatron.core")


def _backend_and_scores(cfg):
    import torch.distributed as dist

    from megatron_rpp.data.rollout_batch import RolloutBatch
    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.models.pipeline import model_device
    from megatron_rpp.models.provider import build_model
    from megatron_rpp.models.scoring import forward_score, response_log_probs_head
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.trainer.optim import OptimConfig, wrap_for_training

    groups = initialize_parallel(1, 1)
    spec = architecture_for_config(cfg).model_spec(cfg).for_tp(1)
    model = build_model(spec, groups)
    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch.from_sequences(torch.randint(0, spec.vocab_size, (3, 7), generator=g).tolist(),
                                        torch.randint(0, spec.vocab_size, (3, 5), generator=g).tolist())
    assert batch.response_ids.device.type == "cpu"  # a CPU batch, as the controller sends it
    out = {}
    for fused in (True, False):
        head = response_log_probs_head(model, groups, temperature=1.0, fused=fused)
        out[fused] = forward_score(model, groups, batch, head, micro_batch_size=2)
    bf16 = build_model(spec, groups, dtype=torch.bfloat16)
    _, opt = wrap_for_training(bf16, OptimConfig(lr=1e-4), dtype=torch.bfloat16)
    inner = getattr(opt, "chained_optimizers", [opt])
    return {"backend": dist.get_backend(), "device": str(model_device(model)), "scores": out,
            "optimizers": sorted(type(o).__name__ for o in inner)}


def test_nccl_rank_scores_a_cpu_batch_on_a_cuda_model():
    (res,) = run_ranks(_backend_and_scores, 1, tiny_config("llama"), timeout=600)
    assert res["backend"] == "nccl" and res["device"].startswith("cuda")
    fused, logits = res["scores"][True], res["scores"][False]
    assert fused.device.type == "cpu" and torch.isfinite(fused).all()
    torch.testing.assert_close(fused, logits, atol=1e-4, rtol=0)  # fused output layer vs logits path on CUDA
    assert any("Float16" in name or "Distributed" in name for name in res["optimizers"]), res["optimizers"]
