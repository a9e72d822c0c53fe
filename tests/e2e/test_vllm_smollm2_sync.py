"""The real SmolLM2-135M-Instruct: Megatron TP=2 -> an in-process vLLM engine on each rank.

1. Each rank's engine loads the HF folder itself (vLLM's own loader); the self-check
   must pass against Megatron loaded through our mapping — before any sync.
2. One SGD step changes the Megatron weights; the self-check must catch the stale engine.
3. A sync with a small bucket (8 MiB): the engine then equals Megatron to <= 1e-4 on a
   fixed set of sequences sampled before the step and on new samples' sampled-token
   log-probs at T = 0.8.
4. Peak extra memory (VmHWM): of the sync's own working set (a draining stand-in
   engine) with the small bucket vs a whole-model bucket, and of the full sync into vLLM.
   Bounded by a few max(bucket, largest tensor) (the 113 MB embedding travels alone),
   far below a model copy (538 MB).
"""
from __future__ import annotations

import ctypes
import re

import pytest
import torch

from megatron_rpp.parallel.spawn import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.smollm2, pytest.mark.vllm, pytest.mark.distributed]

TOL = 1e-4
BUCKET = 8 << 20
TEMPERATURE = 0.8
LR = 2e-5
SMOLLM2_PARAMS = 134_515_008  # tied embeddings: no lm_head.weight
PROMPTS = [[1, 9690, 314, 260, 3575, 28], [1, 504, 3458, 282, 4649, 314], [1, 18, 19, 20]]


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def _peak_extra_bytes(fn) -> tuple[object, int]:
    """Run ``fn``; return its result and the process's peak RSS above the RSS before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    out = fn()
    return out, (_rss_kib("VmHWM") - before) * 1024


class _Drain:
    """A stand-in engine that drops each tensor as it arrives: the sync's own working set."""

    dtype = torch.float32

    def update_weights(self, named_tensors) -> None:
        for _ in named_tensors:
            pass


def _rank(hf_dir: str, workdir: str) -> dict:
    import torch.distributed as dist

    from megatron_rpp.models.architectures import architecture_for_config
    from megatron_rpp.checkpoint.hf_loader import load_hf_weights
    from megatron_rpp.models.provider import build_gpt_model
    from megatron_rpp.models.spec import load_hf_config
    from megatron_rpp.parallel.groups import initialize_parallel
    from megatron_rpp.rollout.engine import SamplingConfig
    from megatron_rpp.rollout.self_check import (
        EngineTrainerMismatch,
        check_engine_matches_trainer,
        probe_sequences,
        trainer_sequence_log_probs,
    )
    from megatron_rpp.rollout.vllm_engine import VllmEngine
    from megatron_rpp.rollout.weight_sync import sync_weights

    # Large allocations straight from mmap (and back on free): RSS then tracks live tensors.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    groups = initialize_parallel(2, 1)
    cfg = load_hf_config(hf_dir)
    arch = architecture_for_config(cfg)
    spec = arch.model_spec(cfg).for_tp(groups.tp_size)  # 3 KV groups: padded to 4 at TP=2
    model = build_gpt_model(spec, groups)
    load_hf_weights(model, groups, arch, spec, hf_dir)
    engine = VllmEngine(hf_dir, dtype=torch.float32, seed=0, max_model_len=256, max_num_seqs=8)
    out: dict = {}
    try:
        probe = probe_sequences(spec.vocab_size, num=3, length=24)
        out["initial"] = check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)
        sampling = SamplingConfig(temperature=TEMPERATURE, max_tokens=16, n=2, seed=3)
        fixed = [PROMPTS[r.prompt_index] + r.token_ids for r in engine.generate(PROMPTS, sampling)]
        before = trainer_sequence_log_probs(model, groups, fixed)

        # One SGD step on loss = Σ logits ⊙ probe.
        from megatron_rpp.models.pipeline import MicroBatch, forward_backward

        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=g)
        shard = spec.vocab_size // groups.tp_size
        weights = (torch.randn(2, 16, spec.vocab_size, generator=g) / 32)[..., groups.tp_rank * shard:(groups.tp_rank + 1) * shard]
        forward_backward(model, [MicroBatch(tokens)], lambda lg, mb: ((lg * weights).sum(), {}), groups, forward_only=False)
        # Small enough to keep the model sane, large enough to move the log-probs visibly: at
        # lr 2e-5 the step moves log-probs by up to ~5 nats and the engine-vs-Megatron gap stays
        # at the pre-step fp32 noise floor (3-4e-5 on an AVX-512/AMX Xeon). At lr 5e-4 / 1e-3 the
        # step moves them by ~30 nats, and two fp32 implementations of that wrecked model differ
        # by 0.8e-4 / 1.4e-4 there (the exact same weights: the noise of vLLM's oneDNN kernels).
        torch.optim.SGD(model.parameters(), lr=LR).step()
        model.zero_grad(set_to_none=True)
        after = trainer_sequence_log_probs(model, groups, fixed)
        out["step_changed_log_probs"] = max(float((a - b).abs().max()) for a, b in zip(after, before))
        try:
            check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)
            out["stale_caught"] = False
        except EngineTrainerMismatch:
            out["stale_caught"] = True

        dist.barrier()
        stats, out["peak_extra_bytes"] = _peak_extra_bytes(
            lambda: sync_weights(model, groups, spec, arch, engine, bucket_bytes=BUCKET)
        )
        out["stats"] = stats
        engine_fixed = engine.score([s[:1] for s in fixed], [s[1:] for s in fixed])
        out["fixed_gap"] = max(float((e - t).abs().max()) for e, t in zip(engine_fixed, after))
        out["probe"] = check_engine_matches_trainer(engine, model, groups, probe, max_abs_tol=TOL)
        responses = engine.generate(PROMPTS, SamplingConfig(temperature=TEMPERATURE, max_tokens=16, n=2, seed=5))
        seqs = [PROMPTS[r.prompt_index] + r.token_ids for r in responses]
        trainer_t = trainer_sequence_log_probs(model, groups, seqs, temperature=TEMPERATURE)
        out["sampled_gap"] = max(
            float((r.log_probs - t[len(PROMPTS[r.prompt_index]) - 1:]).abs().max()) for r, t in zip(responses, trainer_t)
        )
        # The sync's own working set (no engine): bounded by the bucket, vs a whole-model bucket.
        for name, bucket in (("small", BUCKET), ("whole_model", 1 << 30)):
            dist.barrier()
            _, out[f"own_peak_{name}"] = _peak_extra_bytes(
                lambda: sync_weights(model, groups, spec, arch, _Drain(), bucket_bytes=bucket)
            )
        out["model_bytes"] = 4 * sum(p.numel() for p in model.parameters()) * groups.tp_size  # ~full fp32 model
        out["largest_tensor_bytes"] = 4 * spec.vocab_size * spec.hidden_size
    finally:
        engine.shutdown()
    return out


def test_smollm2_tp2_sync_matches_megatron_with_bounded_memory(tmp_path):
    from megatron_rpp.checkpoint.smollm2 import materialize_smollm2

    hf_dir = str(materialize_smollm2())
    per_rank = run_ranks(_rank, 2, hf_dir, str(tmp_path), timeout=600)
    for rank, res in enumerate(per_rank):
        what = f"rank {rank}"
        print(f"rank {rank}: sync {res['stats']}, peak extra {res['peak_extra_bytes'] / 2**20:.0f} MiB, "
              f"own {res['own_peak_small'] / 2**20:.0f} MiB (bucket {BUCKET >> 20} MiB) / "
              f"{res['own_peak_whole_model'] / 2**20:.0f} MiB (1 GiB bucket), gaps {res['fixed_gap']:.2e} "
              f"{res['sampled_gap']:.2e} {res['probe']['max_abs_diff']:.2e}, initial {res['initial']['max_abs_diff']:.2e}")
        assert res["initial"]["max_abs_diff"] <= TOL, what  # vLLM's own loader == our mapping
        assert res["step_changed_log_probs"] > 1e-2, (what, res["step_changed_log_probs"])
        assert res["stale_caught"], what
        assert res["fixed_gap"] <= TOL, f"{what}: {res['fixed_gap']:.3g}"
        assert res["probe"]["max_abs_diff"] <= TOL, what
        assert res["sampled_gap"] <= TOL, f"{what}: {res['sampled_gap']:.3g}"
        stats = res["stats"]
        assert stats.bytes == 4 * SMOLLM2_PARAMS, stats  # every HF tensor exactly once, fp32, padding dropped
        assert stats.max_bucket_bytes <= max(BUCKET, res["largest_tensor_bytes"])
        # Our side: one gathered bucket (<= max(bucket, largest tensor): the 113 MB embedding
        # travels alone) + one reassembled tensor of a small bucket — vs a model copy and
        # more when the bucket holds the whole model.
        floor = max(BUCKET, res["largest_tensor_bytes"])
        assert res["own_peak_small"] <= floor + BUCKET + (16 << 20), (res["own_peak_small"], floor)
        assert res["own_peak_whole_model"] > res["model_bytes"] / 2 + res["own_peak_small"]
        # The full sync adds vLLM's in-place reload of one layer: on CPU the embedding is
        # re-materialised and its GEMM weight re-packed (also for the tied lm_head).
        assert res["peak_extra_bytes"] <= 4 * floor + (32 << 20), (res["peak_extra_bytes"], floor)
        assert res["peak_extra_bytes"] < 0.7 * res["model_bytes"]
